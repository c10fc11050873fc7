"""Generation defaults: what a checkpoint recommends in ``generation_config.json`` (or, for old checkpoints, the
generation keys of ``config.json``), overridden by what the caller asks for, resolved as transformers does.

Each effective setting remembers where it came from (``flag``, ``checkpoint`` or ``default``), so ``--stats`` and
``--json`` can say why a run sampled or stopped where it did.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from phi_core.checkpoint import has_file, read_checkpoint_text
from phi_core.errors import ConfigError
from phi_core.generation import GenerationParams, SamplingParams

log = logging.getLogger("phi_core")
Origin = Literal["flag", "checkpoint", "default"]
GENERATION_CONFIG = "generation_config.json"

# transformers' own fallbacks (GenerationConfig._get_default_generation_params), except the length: transformers
# stops at 20 tokens in all (prompt included), which cuts a completion short; phi generates 128 new tokens.
BUILT_IN: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "max_new_tokens": 128,
    "max_length": None,
    "eos_token_id": None,  # None: the tokenizer's <|endoftext|>
    "pad_token_id": None,
}
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")
# Keys that change what transformers generates and that phi does not implement, with the value that is a no-op.
UNSUPPORTED = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "penalty_alpha": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "length_penalty": 1.0,
    "diversity_penalty": 0.0,
    "encoder_repetition_penalty": 1.0,
    "exponential_decay_length_penalty": None,
    "sequence_bias": None,
}


@dataclass(frozen=True)
class SamplingChoices:
    """The settings both a checkpoint and a caller can give (None: not given)."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class GenerationDefaults(SamplingChoices):
    """The generation settings a checkpoint sets (None: not set), and the file they were read from."""

    max_length: int | None = None
    eos_token_id: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    source: str = ""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str, legacy: bool = False) -> GenerationDefaults:
        """Read a ``generation_config.json`` object (``legacy``: the generation keys of an old ``config.json``,
        where every other key is model config and is not reported)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a JSON object")
        values = {name: reader(raw, name, source) for name, reader in _READERS.items() if raw.get(name) is not None}
        if not legacy:
            _note_unsupported(raw, source)
        return cls(**values, source=source)

    def is_set(self, name: str) -> bool:
        return getattr(self, name) is not None


def generation_defaults(folder: Path) -> GenerationDefaults:
    """A checkpoint folder's generation settings: ``generation_config.json``, or else the generation keys of
    ``config.json`` (old checkpoints kept them there, and transformers still reads them)."""
    for name, legacy in ((GENERATION_CONFIG, False), ("config.json", True)):
        if has_file(folder, name):
            return GenerationDefaults.from_dict(_read_json(folder, name), str(folder / name), legacy)
    return GenerationDefaults()


def _read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads(read_checkpoint_text(folder, name))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{folder / name}: not valid JSON ({exc})") from None


@dataclass(frozen=True)
class GenerationOverrides(SamplingChoices):
    """What the caller asked for (None: not given). ``temperature == 0`` means greedy whatever else is set."""

    seed: int | None = None


@dataclass(frozen=True)
class ResolvedGeneration:
    """Effective settings: the parameters generation runs with, and each setting's value and origin."""

    params: GenerationParams
    settings: dict[str, tuple[Any, Origin]]

    def report(self) -> dict[str, dict[str, Any]]:
        """``{name: {"value": ..., "from": ...}}`` for --json and --stats."""
        return {name: {"value": value, "from": origin} for name, (value, origin) in self.settings.items()}


def resolve_generation(
    overrides: GenerationOverrides,
    defaults: GenerationDefaults,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
    logprobs: bool = False,
) -> ResolvedGeneration:
    """Flags over the checkpoint's settings over the built-in defaults, with transformers' rules: sampling-only
    settings do nothing when not sampling, and ``max_new_tokens`` wins over ``max_length``."""
    settings: dict[str, tuple[Any, Origin]] = {}
    for name in BUILT_IN:
        given = getattr(overrides, name, None)
        if given is not None:
            settings[name] = (given, "flag")
        elif defaults.is_set(name):
            settings[name] = (getattr(defaults, name), "checkpoint")
        else:
            settings[name] = (BUILT_IN[name], "default")
    _resolve_sampling_switch(settings, overrides)
    if settings["max_new_tokens"][1] == "flag" or settings["max_length"][1] != "checkpoint":
        settings.pop("max_length")
    elif not defaults.is_set("max_new_tokens"):
        settings.pop("max_new_tokens")  # the checkpoint's max_length (prompt included) decides
    sampling = _sampling_params(settings, overrides.seed)
    max_length = settings.get("max_length", (None, "default"))[0]
    params = GenerationParams(
        max_new_tokens=settings.get("max_new_tokens", (None, "default"))[0] or max_length,
        max_length=max_length,
        stop=stop,
        ignore_eos=ignore_eos,
        sampling=sampling,
        logprobs=logprobs,
        eos_token_ids=settings["eos_token_id"][0],
    )
    if overrides.seed is not None:
        settings["seed"] = (overrides.seed, "flag")
    return ResolvedGeneration(params, settings)


def _resolve_sampling_switch(settings: dict[str, tuple[Any, Origin]], overrides: GenerationOverrides) -> None:
    """A flag temperature of 0 is greedy; any other flag temperature asks for sampling; greedy drops the sampling
    settings, as transformers ignores them."""
    if overrides.temperature is not None and overrides.do_sample is None:
        settings["do_sample"] = (overrides.temperature > 0, "flag")
    if overrides.temperature == 0:
        settings["do_sample"] = (False, "flag")
    if not settings["do_sample"][0]:
        for name in SAMPLING_ONLY:
            settings.pop(name)


def _sampling_params(settings: dict[str, tuple[Any, Origin]], seed: int | None) -> SamplingParams:
    penalty = settings["repetition_penalty"][0]
    if not settings["do_sample"][0]:
        return SamplingParams(temperature=0.0, repetition_penalty=penalty, seed=seed)
    return SamplingParams(
        temperature=settings["temperature"][0],
        top_k=settings["top_k"][0],
        top_p=settings["top_p"][0],
        min_p=settings["min_p"][0],
        repetition_penalty=penalty,
        seed=seed,
    )


# Reading and checking values ----------------------------------------------------------------------------------
def _bool(raw: Mapping[str, Any], key: str, source: str) -> bool:
    value = raw[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _number(low: float, high: float, low_open: bool = False) -> Callable[[Mapping[str, Any], str, str], float]:
    def read(raw: Mapping[str, Any], key: str, source: str) -> float:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        if value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise ConfigError(f"{source}: {key} must be in {bracket}{low}, {high}], got {value!r}")
        return float(value)

    return read


def _count(minimum: int) -> Callable[[Mapping[str, Any], str, str], int]:
    def read(raw: Mapping[str, Any], key: str, source: str) -> int:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
        return value

    return read


def _token_ids(raw: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
    value = raw[key]
    ids = value if isinstance(value, list) else [value]
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ConfigError(f"{source}: {key} must be a token id or a list of token ids, got {value!r}")
    return tuple(ids)


def _token_id(raw: Mapping[str, Any], key: str, source: str) -> int:
    return _count(0)(raw, key, source)


_READERS: dict[str, Callable[[Mapping[str, Any], str, str], Any]] = {
    "do_sample": _bool,
    "temperature": _number(0.0, math.inf),
    "top_k": _count(0),
    "top_p": _number(0.0, 1.0, low_open=True),
    "min_p": _number(0.0, 1.0),
    "repetition_penalty": _number(0.0, math.inf, low_open=True),
    "max_new_tokens": _count(1),
    "max_length": _count(1),
    "eos_token_id": _token_ids,
    "pad_token_id": _token_id,
}
assert set(_READERS) == set(BUILT_IN) == {f.name for f in fields(GenerationDefaults)} - {"source"}


def _note_unsupported(raw: Mapping[str, Any], source: str) -> None:
    """Say which settings that would change transformers' output phi does not implement (no-op values pass)."""
    for key, no_op in UNSUPPORTED.items():
        if key in raw and raw[key] != no_op and raw[key] is not None:
            log.warning("note: %s sets %s=%r, which phi does not implement; ignored", source, key, raw[key])
