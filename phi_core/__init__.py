"""phi_core: a pure-PyTorch implementation of Microsoft's Phi models (Phi-1, Phi-1.5, Phi-2).

The public entry points are :func:`load_model` and :func:`load_tokenizer`.
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
