"""The Phi model configuration: one frozen dataclass, with a constructor per on-disk format.

Formats read (facts in ``docs/convert.md``):

* Hugging Face ``config.json`` as transformers 4.37-4.57 write it (``rope_theta``, ``partial_rotary_factor``,
  ``rope_scaling``, ``torch_dtype``) and as transformers 5.x write it (``rope_parameters``, ``dtype``);
* the two ``trust_remote_code`` formats: ``mixformer-sequential`` and ``phi-msft`` (``n_embd``, ``n_layer``...).

The defaults are microsoft/phi-1_5.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from phi_core.errors import ConfigError
from phi_core.files import read_text_file

RopeKind = Literal["linear", "dynamic"]
ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
# A label name is made for each label a config counts without naming them, so a config claiming 10**9 labels would
# exhaust memory before its weights could contradict it; real classification heads have far fewer.
MAX_LABELS = 100_000

# Keys that carry no information for inference (training-only values, bookkeeping). Known, so not reported.
_HF_BOOKKEEPING = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "_name_or_path",
        "auto_map",
        "use_cache",
        "initializer_range",
        "resid_pdrop",
        "embd_pdrop",
        "attention_dropout",
        "classifier_dropout",
        "token_classification_bias",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "_attn_implementation",
        "_commit_hash",
        "use_bfloat16",
        "finetuning_task",
        "tokenizer_class",
        "chunk_size_feed_forward",
        "is_decoder",
        "is_encoder_decoder",
        "label2id",
        "num_labels",
        "head_dim",
    }
)
_REMOTE_BOOKKEEPING = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "_name_or_path",
        "auto_map",
        "phyagi_version",
        "initializer_range",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "flash_attn",
        "flash_rotary",
        "fused_dense",
        "img_processor",
        "embd_layer",
        "architecture",
        "pad_vocab_size_multiple",
        "use_cache",
        "checkpointing",
        "num_experts_per_tok",
        "num_local_experts",
    }
)


@dataclass(frozen=True)
class RopeScaling:
    """Rotary position scaling: ``linear`` divides positions by ``factor``; ``dynamic`` is NTK-aware scaling
    that raises the rotary base once a sequence grows past ``max_position_embeddings``."""

    kind: RopeKind
    factor: float


@dataclass(frozen=True)
class PhiConfig:
    """Everything the model needs to know about a Phi checkpoint's shape and numerics."""

    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qk_layernorm: bool = False
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str | None = None
    id2label: Mapping[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: ProblemType | None = None
    ignored_keys: tuple[str, ...] = ()
    # The on-disk format this config was read from ("hf", "mixformer-sequential" or "phi-msft"); not written out.
    source_format: str = field(default="hf", compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    # Derived values ------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {label: index for index, label in self.id2label.items()}

    def with_labels(self, labels: list[str], problem_type: ProblemType | None = None) -> PhiConfig:
        """A copy with new classification labels (used when a head is trained)."""
        return replace(self, id2label=dict(enumerate(labels)), problem_type=problem_type)

    # Readers ------------------------------------------------------------------------------------------------
    @classmethod
    def from_json_file(cls, path: str | Path) -> PhiConfig:
        """Read a ``config.json`` of any supported format (a regular file of sane size: see ``docs/security.md``)."""
        path = Path(path)
        try:
            raw = json.loads(read_text_file(path))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PhiConfig:
        """Read a config dict, choosing the format from its keys (not from ``model_type``, which lies)."""
        config_format = detect_config_format(raw)
        return replace(config_format.reader(raw), source_format=config_format.name)

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> PhiConfig:
        """Read a transformers ``config.json`` (4.37+ or 5.x layout)."""
        model_type = raw.get("model_type", "phi")
        if model_type != "phi":
            raise ConfigError(f"model_type is {model_type!r}; this is not a Phi checkpoint")
        theta, factor, scaling = _read_rope(raw)
        heads = _int(raw, "num_attention_heads", 32)
        kv_heads = raw.get("num_key_value_heads")
        known = _HF_BOOKKEEPING | _HF_FIELDS
        return cls(
            vocab_size=_int(raw, "vocab_size", 51200),
            hidden_size=_int(raw, "hidden_size", 2048),
            intermediate_size=_int(raw, "intermediate_size", 8192),
            num_hidden_layers=_int(raw, "num_hidden_layers", 24),
            num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else _int(raw, "num_key_value_heads", heads),
            partial_rotary_factor=factor,
            rope_theta=theta,
            rope_scaling=scaling,
            qk_layernorm=_bool(raw, "qk_layernorm", False),
            layer_norm_eps=_float(raw, "layer_norm_eps", 1e-5),
            hidden_act=_str(raw, "hidden_act", "gelu_new"),
            max_position_embeddings=_int(raw, "max_position_embeddings", 2048),
            tie_word_embeddings=_bool(raw, "tie_word_embeddings", False),
            pad_token_id=_token_id(raw, "pad_token_id"),
            bos_token_id=_token_id(raw, "bos_token_id"),
            eos_token_id=_token_id(raw, "eos_token_id"),
            torch_dtype=_read_dtype(raw),
            id2label=_read_labels(raw),
            problem_type=_read_problem_type(raw),
            ignored_keys=tuple(sorted(k for k in raw if k not in known)),
        )

    @classmethod
    def from_remote_dict(cls, raw: Mapping[str, Any]) -> PhiConfig:
        """Read a ``trust_remote_code`` config (``mixformer-sequential`` or ``phi-msft``): ``n_embd``, ``n_layer``..."""
        hidden = _int(raw, "n_embd", 1024)
        heads = _int(raw, "n_head", 16)
        if heads <= 0 or hidden % heads:
            raise ConfigError(f"n_embd ({hidden}) is not a multiple of n_head ({heads})")
        head_dim = hidden // heads
        # The remote code clamps rotary_dim to the head size and pads the vocabulary to a multiple of 64.
        rotary_dim = min(_int(raw, "rotary_dim", 32), head_dim)
        multiple = _int(raw, "pad_vocab_size_multiple", 64)
        vocab = math.ceil(_int(raw, "vocab_size", 50304) / multiple) * multiple
        kv_heads = raw.get("n_head_kv")
        inner = raw.get("n_inner")
        if raw.get("tie_word_embeddings"):
            raise ConfigError("tie_word_embeddings is true, but remote-code Phi checkpoints never tie the head")
        known = _REMOTE_BOOKKEEPING | _REMOTE_FIELDS
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=4 * hidden if inner is None else _int(raw, "n_inner", 4 * hidden),
            num_hidden_layers=_int(raw, "n_layer", 20),
            num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else _int(raw, "n_head_kv", heads),
            partial_rotary_factor=rotary_dim / head_dim,
            rope_theta=10000.0,
            layer_norm_eps=_float(raw, "layer_norm_epsilon", 1e-5),
            hidden_act=_str(raw, "activation_function", "gelu_new"),
            max_position_embeddings=_int(raw, "n_positions", 2048),
            bos_token_id=_token_id(raw, "bos_token_id"),
            eos_token_id=_token_id(raw, "eos_token_id"),
            torch_dtype=_read_dtype(raw),
            ignored_keys=tuple(sorted(k for k in raw if k not in known)),
        )

    # Writer -------------------------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers 4.37+ and 5.x both load as this config.

        It uses the 4.37 spelling (top-level ``rope_theta``/``partial_rotary_factor``/``rope_scaling``): 5.x folds
        those into its ``rope_parameters``, while 4.x ignores ``rope_parameters``.
        """
        out: dict[str, Any] = {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_theta": self.rope_theta,
            "rope_scaling": (
                None
                if self.rope_scaling is None
                else {
                    "type": self.rope_scaling.kind,
                    "rope_type": self.rope_scaling.kind,
                    "factor": self.rope_scaling.factor,
                }
            ),
            "qk_layernorm": self.qk_layernorm,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attention_dropout": 0.0,
            "id2label": {str(i): label for i, label in self.id2label.items()},
            "label2id": self.label2id,
        }
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        if self.problem_type is not None:
            out["problem_type"] = self.problem_type
        return out


# Fields each reader consumes; everything else that is not bookkeeping is reported in ``ignored_keys``.
_HF_FIELDS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "partial_rotary_factor",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "qk_layernorm",
        "layer_norm_eps",
        "hidden_act",
        "max_position_embeddings",
        "tie_word_embeddings",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "torch_dtype",
        "dtype",
        "id2label",
        "problem_type",
    }
)
_REMOTE_FIELDS = frozenset(
    {
        "vocab_size",
        "n_embd",
        "n_inner",
        "n_layer",
        "n_head",
        "n_head_kv",
        "rotary_dim",
        "layer_norm_epsilon",
        "activation_function",
        "n_positions",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "torch_dtype",
        "dtype",
        "pad_vocab_size_multiple",
    }
)


@dataclass(frozen=True)
class ConfigFormat:
    """One on-disk config format: its name and the reader for it."""

    name: Literal["hf", "mixformer-sequential", "phi-msft"]

    def reader(self, raw: Mapping[str, Any]) -> PhiConfig:
        if self.name == "hf":
            return PhiConfig.from_hf_dict(raw)
        return PhiConfig.from_remote_dict(raw)


def detect_config_format(raw: Mapping[str, Any]) -> ConfigFormat:
    """Tell the config formats apart by their keys: remote configs say ``n_embd``, HF ones ``hidden_size``."""
    remote = "n_embd" in raw or "n_layer" in raw
    hf = "hidden_size" in raw or "num_hidden_layers" in raw
    if remote and hf:
        raise ConfigError("config mixes remote-code keys (n_embd/n_layer) with transformers keys (hidden_size)")
    if not remote:
        return ConfigFormat("hf")
    if raw.get("model_type") == "mixformer-sequential" or "architecture" in raw or "embd_layer" in raw:
        return ConfigFormat("mixformer-sequential")
    return ConfigFormat("phi-msft")


# Field readers: each names the field it rejects -------------------------------------------------------------
def _int(raw: Mapping[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def _float(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _str(raw: Mapping[str, Any], key: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _token_id(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if isinstance(value, list):  # some configs list several eos ids; the first is the canonical one
        value = value[0] if value else None
    if value is None:
        return None
    return _int({key: value}, key, 0)


def _read_dtype(raw: Mapping[str, Any]) -> str | None:
    old, new = raw.get("torch_dtype"), raw.get("dtype")
    if old is not None and new is not None and old != new:
        raise ConfigError(f"torch_dtype ({old!r}) and dtype ({new!r}) disagree")
    value = new if new is not None else old
    if value is not None and value not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {value!r}")
    return value


def _read_rope(raw: Mapping[str, Any]) -> tuple[float, float, RopeScaling | None]:
    """(rope_theta, partial_rotary_factor, scaling) from either the 4.37 or the 5.x spelling."""
    params = raw.get("rope_parameters")
    legacy_theta = _float(raw, "rope_theta", 10000.0)
    legacy_factor = _float(raw, "partial_rotary_factor", 0.5)
    legacy_scaling = raw.get("rope_scaling")
    if params is None:
        return legacy_theta, legacy_factor, _read_scaling(legacy_scaling, "rope_scaling")
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be an object, got {params!r}")
    theta = _float(params, "rope_theta", legacy_theta)
    factor = _float(params, "partial_rotary_factor", legacy_factor)
    for key, new, old in (("rope_theta", theta, legacy_theta), ("partial_rotary_factor", factor, legacy_factor)):
        if key in raw and new != old:
            raise ConfigError(f"{key} ({old}) contradicts rope_parameters.{key} ({new})")
    scaling = _read_scaling(params, "rope_parameters")
    if legacy_scaling is not None and _read_scaling(legacy_scaling, "rope_scaling") != scaling:
        raise ConfigError("rope_scaling contradicts rope_parameters")
    return theta, factor, scaling


def _read_scaling(value: Any, key: str) -> RopeScaling | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be an object or null, got {value!r}")
    kind = value.get("rope_type", value.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "dynamic"):
        raise ConfigError(f"{key}: rope type {kind!r} is not supported (use linear or dynamic)")
    factor = _float(value, "factor", 0.0)
    if factor < 1.0:
        raise ConfigError(f"{key}.factor must be a number >= 1, got {value.get('factor')!r}")
    return RopeScaling(kind=kind, factor=factor)


def _read_labels(raw: Mapping[str, Any]) -> dict[int, str]:
    id2label = raw.get("id2label")
    if id2label is None:
        count = _int(raw, "num_labels", 2)
        if not 0 < count <= MAX_LABELS:
            raise ConfigError(f"num_labels must be between 1 and {MAX_LABELS:,}, got {count:,}")
        return {i: f"LABEL_{i}" for i in range(count)}
    if not isinstance(id2label, dict) or not id2label:
        raise ConfigError(f"id2label must be a non-empty object, got {id2label!r}")
    try:
        labels = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        raise ConfigError(f"id2label keys must be integers, got {sorted(id2label)!r}") from None
    if sorted(labels) != list(range(len(labels))):
        raise ConfigError(f"id2label keys must be 0..{len(labels) - 1}, got {sorted(labels)}")
    if "num_labels" in raw and raw["num_labels"] != len(labels):
        raise ConfigError(f"num_labels ({raw['num_labels']}) contradicts id2label ({len(labels)} labels)")
    return dict(sorted(labels.items()))


def _read_problem_type(raw: Mapping[str, Any]) -> ProblemType | None:
    value = raw.get("problem_type")
    if value is not None and value not in PROBLEM_TYPES:
        raise ConfigError(f"problem_type must be one of {', '.join(PROBLEM_TYPES)}, got {value!r}")
    return value


def _validate(config: PhiConfig) -> None:
    positive = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    )
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"hidden_size ({config.hidden_size}) is not a multiple of num_attention_heads "
            f"({config.num_attention_heads})"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(
            f"num_attention_heads ({config.num_attention_heads}) is not a multiple of num_key_value_heads "
            f"({config.num_key_value_heads})"
        )
    if not 0.0 < config.partial_rotary_factor <= 1.0:
        raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {config.partial_rotary_factor}")
    if config.rotary_dim < 2 or config.rotary_dim % 2:
        raise ConfigError(
            f"partial_rotary_factor {config.partial_rotary_factor} gives an odd or empty rotary dimension "
            f"({config.rotary_dim} of head_dim {config.head_dim})"
        )
    if config.rope_theta <= 0:
        raise ConfigError(f"rope_theta must be positive, got {config.rope_theta}")
    if config.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"hidden_act {config.hidden_act!r} is not supported (use one of {', '.join(ACTIVATIONS)})")
    if config.layer_norm_eps <= 0:
        raise ConfigError(f"layer_norm_eps must be positive, got {config.layer_norm_eps}")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name)
        if value is not None and not 0 <= value < config.vocab_size:
            raise ConfigError(f"{name} ({value}) is outside the vocabulary (size {config.vocab_size})")
