"""Finding a checkpoint (local folder, embedded model or Hub repo) and reading its tensors safely.

Weights are read from ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``) or
``pytorch_model.bin`` through ``torch.load(weights_only=True)``, which refuses any pickle that would run code.
Python files that come with a checkpoint are never imported.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from phi_core.embedded import embedded_model_path
from phi_core.errors import CheckpointError
from phi_core.tokenizer import TOKENIZER_FILES

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(source: str | os.PathLike[str], revision: str | None = None, weights: bool = True) -> Path:
    """A local folder holding the checkpoint: the folder itself, an embedded model, or a Hub snapshot."""
    embedded = embedded_model_path(str(source))
    if embedded is not None:
        return embedded
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; give the checkpoint's folder")
    text = str(source)
    if text.startswith((".", "/", "~")) or not _REPO_ID.match(text):
        raise CheckpointError(f"{text}: no such folder (and not a Hub repo id)")
    return _download(text, revision, weights)


def _download(repo_id: str, revision: str | None, weights: bool) -> Path:
    """Fetch only the files a Phi checkpoint needs, preferring safetensors over pickles."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["config.json", "generation_config.json", *TOKENIZER_FILES]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        if weights:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
            if not any(folder.glob("*.safetensors")):
                folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["pytorch_model*"]))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: not in the local Hugging Face cache, and the Hub cannot be reached (offline?)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{repo_id}: download failed ({_first_line(exc)})") from None
    return folder


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, on the CPU, in their stored dtype."""
    return dict(iter_tensors(folder))


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors one at a time, so a converter can hold one tensor at a time."""
    if (folder / SAFETENSORS_INDEX).is_file():
        for shard, keys in shard_index(folder / SAFETENSORS_INDEX).items():
            yield from _safetensors_tensors(shard, keys)
    elif (folder / SAFETENSORS).is_file():
        yield from _safetensors_tensors(folder / SAFETENSORS)
    elif (folder / PICKLE_INDEX).is_file():
        for shard, keys in shard_index(folder / PICKLE_INDEX).items():
            yield from ((k, v) for k, v in _pickle_tensors(shard) if k in keys)
    elif (folder / PICKLE).is_file():
        yield from _pickle_tensors(folder / PICKLE)
    else:
        raise CheckpointError(
            f"{folder}: no weights file ({SAFETENSORS}, {SAFETENSORS_INDEX}, {PICKLE} or {PICKLE_INDEX})"
        )


def shard_index(index_path: Path) -> dict[Path, set[str]]:
    """Each shard file of an index with the tensor names the index takes from it (a shard may hold more)."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards: dict[Path, set[str]] = {}
        for key, name in sorted(weight_map.items()):
            shards.setdefault(index_path.parent / name, set()).add(key)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index ({_first_line(exc)})") from None
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: lists {shard.name}, which is missing")
    return shards


def _safetensors_tensors(path: Path, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = [key for key in handle.keys() if keys is None or key in keys]  # noqa: SIM118 - not iterable
        for name in names:
            # A handle maps the whole file, and every page read stays in this process's resident memory until the
            # handle closes: one handle per tensor keeps that to one tensor's pages (measured at the phi-1.5 shape
            # in float16, loaded as bfloat16: peak 5.99 GB with one handle for the file, 3.63 GB with this).
            with safe_open(str(path), framework="pt") as handle:
                tensor = handle.get_tensor(name)
            yield name, tensor
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def _pickle_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: it holds more than tensors (weights_only=True; {_first_line(exc)})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({_first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a flat dict of tensors")
    yield from state.items()


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
