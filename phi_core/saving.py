"""Writing checkpoint folders in the current layout, atomically: everything goes to a temporary folder beside
the target, which is renamed into place only once complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from phi_core.config import PhiConfig
from phi_core.errors import PhiError
from phi_core.model import PhiPreTrained
from phi_core.precision import dtype_name

ARCHITECTURES = {
    "causal-lm": "PhiForCausalLM",
    "sequence-classification": "PhiForSequenceClassification",
    "token-classification": "PhiForTokenClassification",
}


@contextmanager
def atomic_folder(output: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; on success it replaces ``output``, on failure it vanishes.

    Without ``force`` an existing ``output`` is refused and left untouched.
    """
    output = Path(output)
    if output.exists() and not force:
        raise PhiError(f"{output}: already exists (use --force to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield staging
        _normal_permissions(staging)
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(staging, output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the result the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_config(folder: Path, config: PhiConfig, task: str) -> None:
    """config.json (loadable by transformers 4.37+ and 5.x) and generation_config.json."""
    raw = config.to_hf_dict()
    raw["architectures"] = [ARCHITECTURES[task]]
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def model_tensors(model: PhiPreTrained, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors as a checkpoint stores them (a tied head is stored once, as the embedding)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}


def save_model(
    model: PhiPreTrained,
    output: Path,
    task: str,
    dtype: torch.dtype | None = None,
    tokenizer_dir: Path | None = None,
    force: bool = False,
    tokenizer_files: tuple[str, ...] | None = None,
) -> None:
    """Save ``model`` as a current-layout checkpoint folder, with the tokenizer files of ``tokenizer_dir`` (all, or
    only ``tokenizer_files``)."""
    with atomic_folder(output, force=force) as staging:
        config = model.config
        if dtype is not None:
            config = with_dtype(config, dtype)
        write_config(staging, config, task)
        save_file(model_tensors(model, dtype), str(staging / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, staging, tokenizer_files)


def copy_tokenizer(source: Path, target: Path, names: tuple[str, ...] | None = None) -> None:
    """Copy the tokenizer files of ``source`` that exist (all of them, or only ``names``)."""
    from phi_core.tokenizer import TOKENIZER_FILES

    for name in names or TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def with_dtype(config: PhiConfig, dtype: torch.dtype) -> PhiConfig:
    """``config`` recording ``dtype`` as the checkpoint's stored dtype."""
    return replace(config, torch_dtype=dtype_name(dtype))
