"""Finding a checkpoint (local folder, embedded model or Hub repo) and reading its files safely.

Weights are read from ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``) or
``pytorch_model.bin`` through ``torch.load(weights_only=True)``, which refuses any pickle that would run code.
Python files that come with a checkpoint are never imported. Every file is read through :func:`checkpoint_file`,
which refuses anything that resolves outside the checkpoint or is not a regular file (the security model is in
``docs/security.md``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from phi_core.config import PhiConfig
from phi_core.embedded import EMBEDDED_MODELS, embedded_model_path
from phi_core.errors import CheckpointError
from phi_core.files import TEXT_LIMIT, first_line, read_text_file

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# What a tokenizer may read from a checkpoint folder (and what a download fetches for it).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)
_EMBEDDED_FOLDERS = tuple(folder for folder, _ in EMBEDDED_MODELS.values())
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_UNCACHED = "not in the local Hugging Face cache, and the Hub cannot be reached"
log = logging.getLogger("phi_core")


def resolve_source(source: str | os.PathLike[str], revision: str | None = None, weights: bool = True) -> Path:
    """A local folder holding the checkpoint: the folder itself, an embedded model, or a Hub snapshot.

    A path that exists wins over an embedded model's name (a folder called ``tiny`` is that folder)."""
    text = str(source)
    if not text.strip():
        raise CheckpointError("the model source is empty: give a checkpoint folder, a Hub repo id or an embedded name")
    path = Path(text).expanduser()
    if os.path.lexists(path):
        return _local_folder(path, text)
    embedded = embedded_model_path(text)
    if embedded is not None:
        return embedded
    if text.startswith((".", "/", "~")) or not _REPO_ID.match(text):
        raise CheckpointError(f"{text}: no such folder (and not a Hub repo id)")
    return _download(text, revision, weights)


def _local_folder(path: Path, text: str) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; give the checkpoint's folder")
    if embedded_model_path(text) is not None:
        log.warning("note: using the folder %s, not the embedded model %r of the same name", path.resolve(), text)
    return path


# Reading files inside a checkpoint -------------------------------------------------------------------------------
def checkpoint_roots(folder: Path) -> tuple[Path, ...]:
    """The folders every file of a checkpoint must resolve inside: the checkpoint folder itself; for a Hugging Face
    cache snapshot (``models--org--name/snapshots/REV``, whose files link to ``../../blobs/HASH``) the repo's cache
    folder ``models--org--name``; an embedded model's folder (``tiny``, ``tiny-classifier``, ``tiny-tagger``) and
    the other embedded folders beside it, since the heads share their base's weights (``../tiny/model.safetensors``).
    """
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return (folder.parent.parent,)
    if folder.name in _EMBEDDED_FOLDERS:
        return tuple(folder.parent / name for name in _EMBEDDED_FOLDERS)
    return (folder,)


def checkpoint_file(folder: Path, name: str, limit: int | None = None) -> Path:
    """The resolved path of file ``name`` of a checkpoint folder, once it is known to stay inside the checkpoint
    (:func:`checkpoint_roots`), to be a regular file (not a FIFO, device or folder) and to hold at most ``limit``
    bytes. Every reader of a checkpoint's files goes through here."""
    path = folder / name
    try:
        resolved = path.resolve(strict=True)
        info = resolved.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on Python < 3.13
        raise CheckpointError(f"{path}: cannot be opened ({first_line(exc)})") from None
    if not any(resolved.is_relative_to(root) for root in checkpoint_roots(folder)):
        raise CheckpointError(f"{path}: leads outside the checkpoint folder (to {resolved}); refused")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file; refused")
    if limit is not None and info.st_size > limit:
        size = f"{info.st_size:,} bytes"
        raise CheckpointError(f"{path}: {size}, more than the {limit:,} bytes such a file can need; refused")
    return resolved


def read_checkpoint_text(folder: Path, name: str) -> str:
    """The UTF-8 text of file ``name`` of a checkpoint folder (config.json, an index, a tokenizer file), checked by
    :func:`checkpoint_file` and read with :func:`read_text_file`."""
    return read_text_file(checkpoint_file(folder, name, TEXT_LIMIT))


def read_config(folder: Path) -> PhiConfig:
    """The checkpoint's ``config.json``."""
    return PhiConfig.from_json_file(checkpoint_file(folder, "config.json", TEXT_LIMIT))


def has_file(folder: Path, name: str) -> bool:
    """Whether the checkpoint has an entry ``name`` of any kind (a broken link or a FIFO too, so that reading it
    gives a clear error instead of the file being silently skipped)."""
    return os.path.lexists(folder / name)


# The Hub -------------------------------------------------------------------------------------------------------
def _download(repo_id: str, revision: str | None, weights: bool) -> Path:
    """Fetch only the files a Phi checkpoint needs, preferring safetensors over pickles; the local cache first, the
    network only when the cache lacks them. huggingface_hub's own warnings and retries are kept off the terminal:
    failures become one CheckpointError."""
    from huggingface_hub import constants

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cached = _cached_snapshot(repo_id, revision, weights)
            if cached is not None:
                return cached
            if constants.HF_HUB_OFFLINE:
                raise CheckpointError(f"{repo_id}: {_UNCACHED} (HF_HUB_OFFLINE is set)")
            _probe_hub(repo_id, revision)
            return _fetch(repo_id, revision, weights)
    finally:
        hub_log.setLevel(level)


def _cached_snapshot(repo_id: str, revision: str | None, weights: bool) -> Path | None:
    """The cached snapshot of the revision when it already holds what is needed, else None (no network)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # whatever the cache lacks, the network may still provide
        return None
    if not has_file(folder, "config.json"):
        return None
    if weights:
        try:
            weight_files(folder)
        except CheckpointError:
            return None
    return folder


def _probe_hub(repo_id: str, revision: str | None) -> None:
    """Check in one request that the Hub answers and has the repo and revision: snapshot_download would retry an
    unreachable Hub for half a minute (printing each retry) before giving up."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: no revision {revision!r} on the Hugging Face Hub") from None
    except Exception as exc:  # network errors differ between huggingface_hub versions (requests, httpx)
        raise CheckpointError(f"{repo_id}: {_UNCACHED} ({first_line(exc)})") from None


def _fetch(repo_id: str, revision: str | None, weights: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    patterns = ["config.json", "generation_config.json", *TOKENIZER_FILES]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        if weights:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
            if not any(folder.glob("*.safetensors")):
                folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["pytorch_model*"]))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"{repo_id}: download failed ({first_line(exc)})") from None
    return folder


# Weights -------------------------------------------------------------------------------------------------------
def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, on the CPU, in their stored dtype."""
    return dict(iter_tensors(folder))


def weight_files(folder: Path) -> tuple[str, dict[Path, set[str] | None]]:
    """The checkpoint's weights format (``"safetensors"`` or ``"pickle"``) and its weight files, each resolved and
    checked by :func:`checkpoint_file`, with the tensor names an index takes from each (None: all)."""
    for name in (SAFETENSORS_INDEX, SAFETENSORS, PICKLE_INDEX, PICKLE):
        if has_file(folder, name):
            kind = "safetensors" if name.startswith(SAFETENSORS) else "pickle"
            if name.endswith(".json"):
                return kind, dict(shard_index(folder, name))
            return kind, {checkpoint_file(folder, name): None}
    raise CheckpointError(f"{folder}: no weights file ({SAFETENSORS}, {SAFETENSORS_INDEX}, {PICKLE} or {PICKLE_INDEX})")


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors one at a time, so a converter can hold one tensor at a time."""
    kind, files = weight_files(folder)
    read = _safetensors_tensors if kind == "safetensors" else _pickle_tensors
    for path, keys in files.items():
        yield from read(path, keys)


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape without reading the tensors (safetensors headers; a pickle has to be opened), so the
    config can be checked against the weights before anything is built from it."""
    kind, files = weight_files(folder)
    if kind == "pickle":
        return {name: tuple(tensor.shape) for name, tensor in iter_tensors(folder)}
    shapes: dict[str, tuple[int, ...]] = {}
    for path, keys in files.items():
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - the handle is not iterable
                    if keys is None or name in keys:
                        shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    return shapes


def shard_index(folder: Path, index_name: str) -> dict[Path, set[str]]:
    """Each shard file of an index, resolved and checked, with the tensor names the index takes from it (a shard
    may hold more). An entry that is absolute, or leads outside the checkpoint (``..``, a link), is refused."""
    index_path = folder / index_name
    try:
        weight_map = json.loads(read_checkpoint_text(folder, index_name))["weight_map"]
        entries: dict[str, set[str]] = {}
        for key, name in sorted(weight_map.items()):
            entries.setdefault(_shard_entry(index_path, name), set()).add(key)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid shard index ({first_line(exc)})") from None
    shards: dict[Path, set[str]] = {}
    for name, keys in entries.items():
        if not has_file(folder, name):
            raise CheckpointError(f"{index_path}: lists {name}, which is missing")
        shards.setdefault(checkpoint_file(folder, name), set()).update(keys)
    return shards


def _shard_entry(index_path: Path, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index_path}: a weight_map entry is {name!r}, not a file name")
    if Path(name).is_absolute():
        raise CheckpointError(f"{index_path}: lists {name!r}, an absolute path; refused")
    return name


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
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None


def _pickle_tensors(path: Path, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: it holds more than tensors (weights_only=True; {first_line(exc)})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch weights file ({first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a flat dict of tensors")
    yield from ((k, v) for k, v in state.items() if keys is None or k in keys)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"
