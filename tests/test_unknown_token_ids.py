"""Token ids past the tokenizer's vocabulary (every released Phi has 51,200 rows and ~50,295 ids) decode to nothing,
as in transformers, and generation goes on; `--json` still lists them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TOKENIZER_DIR, hf_model
from typer.testing import CliRunner

import phi_core
from phi_cli.main import app
from phi_core.generation import GenerationParams, generate

VOCAB = 50304
UNKNOWN_ID = 50300  # a row of the embedding that the tokenizer has no token for


@pytest.fixture(scope="module")
def prefers_unknown_id(tmp_path_factory):
    """A model whose head strongly prefers UNKNOWN_ID, with the real tokenizer files: (reference, folder)."""
    reference = hf_model(vocab_size=VOCAB, eos_token_id=50256, bos_token_id=50256, seed=4)
    with torch.no_grad():
        reference.lm_head.bias[UNKNOWN_ID] = 100.0
    folder = tmp_path_factory.mktemp("unknown-id")
    reference.save_pretrained(folder)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copyfile(item, folder / item.name)
    return reference, folder


def test_the_fixture_picks_an_id_the_tokenizer_lacks(prefers_unknown_id):
    tokenizer = phi_core.load_tokenizer(prefers_unknown_id[1])
    assert len(tokenizer) <= UNKNOWN_ID
    assert tokenizer.backend.id_to_token(UNKNOWN_ID) is None


def test_unknown_ids_decode_to_nothing_like_transformers(prefers_unknown_id, tokenizer_dir):
    import transformers

    tokenizer = phi_core.load_tokenizer(prefers_unknown_id[1])
    ids = [tokenizer.encode("x =")[0], UNKNOWN_ID, 198]
    expected = transformers.AutoTokenizer.from_pretrained(tokenizer_dir).decode(ids)
    assert tokenizer.decode(ids) == expected
    assert tokenizer.decode_bytes(ids).decode("utf-8") == expected


def test_generation_goes_on_through_unknown_ids(prefers_unknown_id):
    reference, folder = prefers_unknown_id
    model, tokenizer = phi_core.load_model(folder), phi_core.load_tokenizer(folder)
    prompt = tokenizer.encode("def f(x):")
    events = list(generate(model, tokenizer, [prompt], GenerationParams(max_new_tokens=5)))
    tokens = [e.token_id for e in events]
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)[0, len(prompt) :]
    assert tokens == expected.tolist() == [UNKNOWN_ID] * 5
    assert "".join(e.text for e in events) == ""
    assert events[-1].finish_reason == "length"


def test_cli_json_lists_unknown_ids_and_writes_the_record(prefers_unknown_id):
    folder = prefers_unknown_id[1]
    args = ["generate", "def f(x):", "-m", str(folder), "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["tokens"] == [UNKNOWN_ID] * 4
    assert record["completion"] == ""
    assert record["finish_reason"] == "length"
