"""The embedded models shipped in the package: they load by name, agree with transformers, and run offline."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import phi_core
from phi_cli.main import app
from phi_core.embedded import EMBEDDED_MODELS, embedded_model_path
from phi_core.generation import GenerationParams, generate
from phi_core.tasks import TASKS

CLASSES = {
    "causal-lm": "PhiForCausalLM",
    "sequence-classification": "PhiForSequenceClassification",
    "token-classification": "PhiForTokenClassification",
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_shipped_models_match_transformers(task):
    import transformers

    name = TASKS[task].embedded_default
    folder = embedded_model_path(name)
    ours = phi_core.load_model(name, task=task)
    theirs = getattr(transformers, CLASSES[task]).from_pretrained(folder, dtype=torch.float32)
    tokenizer = phi_core.load_tokenizer(name)
    ids = torch.tensor([tokenizer.encode("import os\n\ndef main(argv):\n    return os.path.join(*argv)  # ok")])
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(folder)("x = 1")["input_ids"] == tokenizer.encode("x = 1")


def test_greedy_generation_is_deterministic_and_python_looking():
    model, tokenizer = phi_core.load_model("tiny"), phi_core.load_tokenizer("tiny")
    prompt = [tokenizer.encode("def fibonacci(n):")]
    params = GenerationParams(max_new_tokens=24)
    first = [e.token_id for e in generate(model, tokenizer, prompt, params)]
    second = [e.token_id for e in generate(model, tokenizer, prompt, params)]
    assert first == second
    text = tokenizer.decode(first)
    assert "\n" in text  # it writes code lines, not one run-on sentence


def test_commands_work_without_a_model_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    generated = runner.invoke(app, ["generate", "def add(a, b):", "--max-new-tokens", "8", "--json"])
    assert generated.exit_code == 0, generated.output
    assert json.loads(generated.stdout)["completion_tokens"] >= 1
    classified = runner.invoke(app, ["classify", "for x in range(3): print(x)", "--json"])
    assert classified.exit_code == 0, classified.output
    assert json.loads(classified.stdout)["label"] in ("code", "prose")
    tagged = runner.invoke(app, ["tag", "if x: return None", "--json"])
    assert tagged.exit_code == 0, tagged.output
    assert {s["label"] for s in json.loads(tagged.stdout)["spans"]} <= {
        "KEYWORD",
        "NAME",
        "STRING",
        "NUMBER",
        "COMMENT",
        "OP",
    }


def test_shipped_files_stay_small():
    total = sum(f.stat().st_size for name in EMBEDDED_MODELS for f in embedded_model_path(name).iterdir())
    assert total < 22 * 10**6


def test_unknown_name_is_not_an_embedded_model():
    assert embedded_model_path("not-a-model") is None
