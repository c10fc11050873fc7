"""Shared fixtures: tiny random Phi checkpoints written by transformers (the oracle) and the real tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# The real Phi-1.5 tokenizer files, beside the checkout (CI clones next to ../shared).
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "phi-1_5-tokenizer"

# Small versions of the real shapes; each test picks one and overrides what it checks.
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
CONFIGS = {
    "phi-1.5-like": dict(partial_rotary_factor=0.5),
    "phi-2-like": dict(hidden_size=80, num_attention_heads=4, partial_rotary_factor=0.4),
    "full-rotary": dict(partial_rotary_factor=1.0),
    "qk-layernorm": dict(qk_layernorm=True),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "rope-linear": dict(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    ),
    "rope-dynamic": dict(
        max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ),
}
HF_TASK_CLASSES = {
    "causal-lm": "PhiForCausalLM",
    "sequence-classification": "PhiForSequenceClassification",
    "token-classification": "PhiForTokenClassification",
}


def hf_model(task: str = "causal-lm", seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A random transformers Phi model of the tiny shape, with non-trivial LayerNorm and bias values."""
    import transformers

    settings = {**TINY, **overrides}
    config = transformers.PhiConfig(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, HF_TASK_CLASSES[task])(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                param.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.2)
    return model


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., tuple[torch.nn.Module, Path]]:
    """Save a random transformers model to a fresh folder; returns (model, folder)."""
    count = 0

    def make(task: str = "causal-lm", config_layout: str = "v5", **overrides: object):
        nonlocal count
        count += 1
        model = hf_model(task, **overrides)
        folder = tmp_path / f"ckpt{count}"
        model.save_pretrained(folder)
        if config_layout == "v4":
            rewrite_config_v4(folder / "config.json")
        return model, folder

    return make


def rewrite_config_v4(path: Path) -> None:
    """Turn a transformers 5.x config.json into the 4.37 spelling (top-level rope fields, torch_dtype)."""
    raw = json.loads(path.read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params["rope_theta"]
    raw["partial_rotary_factor"] = params["partial_rotary_factor"]
    kind = params.get("rope_type", "default")
    raw["rope_scaling"] = None if kind == "default" else {"type": kind, "factor": params["factor"]}
    raw["torch_dtype"] = raw.pop("dtype")
    raw["transformers_version"] = "4.37.0"
    path.write_text(json.dumps(raw))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def lm_checkpoint(tmp_path_factory) -> Path:
    """A random causal LM with the real tokenizer's vocabulary and files: something the CLI can run."""
    import shutil

    model = hf_model(vocab_size=50304, eos_token_id=50256, bos_token_id=50256, seed=5)
    folder = tmp_path_factory.mktemp("lm")
    model.save_pretrained(folder)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copyfile(item, folder / item.name)
    return folder


def checkpoint_with_tokenizer(folder: Path, task: str, **overrides: object) -> Path:
    import shutil

    model = hf_model(task, vocab_size=50304, seed=6, **overrides)
    model.save_pretrained(folder)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copyfile(item, folder / item.name)
    return folder


@pytest.fixture(scope="session")
def classifier_checkpoint(tmp_path_factory) -> Path:
    labels = {0: "code", 1: "prose", 2: "other"}
    return checkpoint_with_tokenizer(
        tmp_path_factory.mktemp("cls"),
        "sequence-classification",
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )


@pytest.fixture(scope="session")
def tagger_checkpoint(tmp_path_factory) -> Path:
    labels = {0: "O", 1: "B-NAME", 2: "I-NAME", 3: "OP"}
    return checkpoint_with_tokenizer(
        tmp_path_factory.mktemp("tag"),
        "token-classification",
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )


@pytest.fixture
def pack_small_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pack every matrix of the tiny test models (phi_core keeps matrices this small dense float32)."""
    import phi_core.linear

    monkeypatch.setattr(phi_core.linear, "SMALL_MATRIX", 0)
