"""The embedded-model training script: a few steps on a few files, end to end (the full run is not in CI)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import phi_core

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"


@pytest.fixture(scope="module")
def train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_models(train_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    lm_args = argparse.Namespace(
        steps=3,
        batch=2,
        seq_len=32,
        lr=1e-3,
        warmup=1,
        limit_files=40,
        eval_batches=1,
        threads=1,
        out=str(root / "tiny"),
        hidden_size=None,
    )
    metrics = train_tiny.train_lm(lm_args)
    head_args = argparse.Namespace(
        base=str(root / "tiny"),
        out_dir=str(root),
        head_files=3,
        chars_per_file=400,
        snippets_per_file=4,
        limit_files=40,
        threads=1,
    )
    head_metrics = train_tiny.train_heads(head_args)
    return root, metrics, head_metrics


def test_lm_checkpoint_is_a_normal_full_vocabulary_phi(smoke_models):
    import transformers

    root, metrics, _ = smoke_models
    assert metrics["steps"] == 3 and metrics["held_out_loss"] > 0
    assert json.loads((root / "tiny" / "training.json").read_text())["held_out_perplexity"] > 1
    assert sorted(p.name for p in (root / "tiny").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "training.json",
    ]
    text = "def f(x):\n    return x"
    assert transformers.AutoTokenizer.from_pretrained(root / "tiny")(text)["input_ids"] == phi_core.load_tokenizer(
        root / "tiny"
    ).encode(text)
    ours = phi_core.load_model(root / "tiny")
    theirs = transformers.PhiForCausalLM.from_pretrained(root / "tiny", dtype=torch.float32)
    assert ours.config.vocab_size == 51200 and ours.config.tie_word_embeddings
    ids = torch.tensor([phi_core.load_tokenizer(root / "tiny").encode("def f(x):\n    return x")])
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-4


def test_heads_share_the_base_weights_and_load_everywhere(smoke_models):
    import transformers

    root, _, metrics = smoke_models
    assert 0 <= metrics["tagger_held_out_accuracy"] <= 1 and 0 <= metrics["classifier_held_out_accuracy"] <= 1
    for name, task, cls in (
        ("tiny-tagger", "token-classification", transformers.PhiForTokenClassification),
        ("tiny-classifier", "sequence-classification", transformers.PhiForSequenceClassification),
    ):
        folder = root / name
        assert not (folder / "model.safetensors").exists()  # only the head is stored; model.* comes from ../tiny
        ours = phi_core.load_model(folder, task=task)
        theirs = cls.from_pretrained(folder, dtype=torch.float32)
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-4


def test_python_tags_come_from_the_tokenize_module(train_tiny):
    spans = train_tiny.python_tags("if x: # hi\n    y = 'a' + 12\n")
    assert [
        (tag, text) for _, _, tag, text in ((*s, "if x: # hi\n    y = 'a' + 12\n"[s[0] : s[1]]) for s in spans)
    ] == [
        ("KEYWORD", "if"),
        ("NAME", "x"),
        ("OP", ":"),
        ("COMMENT", "# hi"),
        ("NAME", "y"),
        ("OP", "="),
        ("STRING", "'a'"),
        ("OP", "+"),
        ("NUMBER", "12"),
    ]


def test_first_token_of_each_word_is_labelled(train_tiny, tokenizer_dir):
    tokenizer = phi_core.load_tokenizer(tokenizer_dir)
    source = "fibonacci = 1\n"
    ids, labels = train_tiny.tag_tokens(tokenizer, source)
    pieces = [tokenizer.decode([i]) for i in ids]
    tagged = [(p, train_tiny.TAGS[label] if label >= 0 else None) for p, label in zip(pieces, labels, strict=True)]
    assert tagged[0] == (pieces[0], "NAME") and len(pieces[0]) < len("fibonacci")
    assert all(tag is None for _, tag in tagged[1 : pieces.index(" =")])  # the rest of "fibonacci" is ignored
    assert (" =", "OP") in tagged and (" 1", "NUMBER") in tagged


def test_held_out_split_is_fixed_by_path(train_tiny):
    files = train_tiny.stdlib_files()
    held = [f for f in files if train_tiny.is_held_out(f)]
    assert 0.02 < len(held) / len(files) < 0.09
    assert held == [f for f in sorted(files, reverse=True) if train_tiny.is_held_out(f)][::-1]


def test_a_wider_model_keeps_heads_of_32_and_a_4x_mlp(train_tiny):
    wide = train_tiny.lm_config(256)
    assert (wide.hidden_size, wide.intermediate_size, wide.num_attention_heads) == (256, 1024, 8)
    assert wide.num_hidden_layers == train_tiny.TINY_CONFIG.num_hidden_layers
    assert train_tiny.lm_config(None) is train_tiny.TINY_CONFIG
