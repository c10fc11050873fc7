"""phi_core: a pure-PyTorch implementation of Microsoft's Phi models (Phi-1, Phi-1.5, Phi-2).

The public entry points are :func:`load_model` and :func:`load_tokenizer`.

Layers (a module imports only from the rows above it; tests/test_architecture.py fails on an import cycle):

    errors, files                      one-line errors; reading a regular file of sane size
    config, embedded                   the typed config and its on-disk readers; the shipped models
    kernels, linear, precision, rotary, cache, attention, batching      the numerics
    checkpoint, tokenizer              finding a checkpoint and reading its files inside it
    model, tasks, layouts              the decoder and heads; one row per task; old layouts' rename table
    loading, saving, convert           checkpoint <-> model (the inference form is one step of loading)
    speculative                        speculative decoding: proposed tokens checked in one pass (prompt lookup, drafts)
    generation, generation_config, prompt_format, completion, conversation, classify, tagging, engine
    records                            the JSON record each batch command writes for one row
    bench_models, bench_report, bench  random weights and transformers twins; reports and writers; the sweep
    metrics, openai_protocol, chat_api, server, distributed    serving, batch jobs on a Ray cluster
"""

from phi_core.config import PhiConfig, RopeScaling
from phi_core.errors import BackendUnavailableError, CheckpointError, ConfigError, PhiError
from phi_core.loading import load_model, load_tokenizer
from phi_core.model import (
    PhiForCausalLM,
    PhiForSequenceClassification,
    PhiForTokenClassification,
    PhiModel,
)
from phi_core.tokenizer import PhiTokenizer

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigError",
    "PhiConfig",
    "PhiError",
    "PhiForCausalLM",
    "PhiForSequenceClassification",
    "PhiForTokenClassification",
    "PhiModel",
    "PhiTokenizer",
    "RopeScaling",
    "load_model",
    "load_tokenizer",
]
