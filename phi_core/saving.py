"""Writing checkpoint folders in the current layout, atomically: everything goes to a staging folder beside the
target, which is renamed into place only once complete, and never over an output that appeared meanwhile."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from phi_core.checkpoint import TOKENIZER_FILES, checkpoint_file, has_file
from phi_core.config import PhiConfig
from phi_core.errors import CheckpointError, PhiError
from phi_core.files import TEXT_LIMIT, first_line
from phi_core.model import PhiPreTrained
from phi_core.precision import dtype_name
from phi_core.tasks import TASKS, task_of


@contextmanager
def atomic_folder(output: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a new staging folder beside ``output``; when the block succeeds it is published as ``output`` by an
    atomic rename, and whatever else happens (an error, Ctrl-C, SIGTERM) it is removed.

    Without ``force`` an existing ``output`` is refused and left untouched, also one that appears while the block
    runs. With ``force`` the old output is moved aside, the new one published, then the old one deleted (it is put
    back if publishing fails). The current directory and its parents are never an output. A failure to write is one
    CheckpointError naming ``output``.
    """
    target = checked_output(output, force)
    staging = None
    try:
        with _signals_end_the_block():
            try:
                staging = _make_staging(target)
                yield staging
                _publish(staging, target, force)
            except (OSError, SafetensorError) as exc:
                raise CheckpointError(f"{output}: cannot be written ({first_line(exc)})") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def checked_output(output: str | os.PathLike[str], force: bool = False) -> Path:
    """``output`` resolved, once it is known not to be the current directory or one of its parents (replacing it
    would delete the folder being worked in), and not to exist unless ``force``."""
    resolved = Path(output).resolve()
    if Path.cwd().resolve().is_relative_to(resolved):
        raise CheckpointError(f"{output}: is the current directory or one of its parents; give a new folder")
    if os.path.lexists(resolved) and not force:
        raise CheckpointError(f"{output}: already exists (use --force to replace it)")
    return resolved


def _make_staging(output: Path) -> Path:
    """A fresh hidden folder beside ``output``, made by mkdir so it gets the umask's permissions like any new folder."""
    output.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = output.parent / f".{output.name}.{secrets.token_hex(4)}.partial"
        with contextlib.suppress(FileExistsError):
            staging.mkdir()
            return staging


def _publish(staging: Path, output: Path, force: bool) -> None:
    if not force:
        try:
            rename_new(staging, output)
        except FileExistsError:
            raise CheckpointError(f"{output}: appeared while writing; kept it (use --force to replace it)") from None
        return
    aside = _move_aside(output)
    try:
        rename_new(staging, output)
    except BaseException:
        if aside is not None:
            _put_back(aside, output)
        raise
    if aside is not None:
        _remove(aside)


def _move_aside(output: Path) -> Path | None:
    if not os.path.lexists(output):
        return None
    aside = output.parent / f".{output.name}.{secrets.token_hex(4)}.old"
    rename_new(output, aside)
    return aside


def _put_back(aside: Path, output: Path) -> None:
    try:
        rename_new(aside, output)
    except OSError:
        raise CheckpointError(
            f"{output}: could not be replaced, and the old one could not be put back: it is {aside}"
        ) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# Linux's renameat2(RENAME_NOREPLACE) renames without ever replacing the target, atomically (glibc >= 2.28).
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _find_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _find_renameat2()


def rename_new(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` atomically; FileExistsError when ``target`` exists, which is never replaced."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):  # EINVAL, ENOSYS: no RENAME_NOREPLACE on this filesystem
            raise OSError(code, os.strerror(code), str(target))
    _rename_reserved(source, target)


def _rename_reserved(source: Path, target: Path) -> None:
    """No-replace rename without renameat2: claim ``target`` first (mkdir for a folder, a hard link for a file; both
    fail when anything is there), then move onto the claim (rename(2) replaces only a still-empty folder)."""
    if not source.is_dir():
        os.link(source, target)
        source.unlink()
        return
    os.mkdir(target)
    try:
        os.rename(source, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(target)
        raise


@contextmanager
def _signals_end_the_block() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit while a staging folder exists, so the cleanup that removes it runs (by
    default they end the process on the spot). Only in the main thread, and only where no handler is set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            previous[number] = signal.signal(number, _exit_on_signal)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _exit_on_signal(number: int, frame: object) -> NoReturn:
    raise SystemExit(128 + number)


def write_config(folder: Path, config: PhiConfig, task: str) -> None:
    """config.json (loadable by transformers 4.37+ and 5.x) and generation_config.json."""
    raw = config.to_hf_dict()
    raw["architectures"] = [TASKS[task].architecture]
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
    dtype: torch.dtype | None = None,
    tokenizer_dir: Path | None = None,
    force: bool = False,
    tokenizer_files: tuple[str, ...] | None = None,
) -> None:
    """Save ``model`` as a current-layout checkpoint folder, with the tokenizer files of ``tokenizer_dir`` (all, or
    only ``tokenizer_files``). A model in its inference form (fused, packed) has lost the checkpoint's names and
    values' layout, and is refused."""
    if model.is_prepared:
        raise PhiError(
            "this model is in its inference form (q/k/v fused, weights packed) and cannot be saved as a checkpoint; "
            "load it with load_model(..., prepare=False) to save it"
        )
    with atomic_folder(output, force=force) as staging:
        config = model.config
        if dtype is not None:
            config = with_dtype(config, dtype)
        write_config(staging, config, task_of(model).name)
        save_file(model_tensors(model, dtype), str(staging / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, staging, tokenizer_files)


def copy_tokenizer(source: Path, target: Path, names: tuple[str, ...] | None = None) -> None:
    """Copy the tokenizer files of ``source`` that exist (all of them, or only ``names``). Each must be a regular file
    inside the checkpoint (a link out of it is refused, not followed); only the content is copied, so each copy has
    the permissions of a new file."""
    for name in names or TOKENIZER_FILES:
        if has_file(source, name):
            shutil.copyfile(checkpoint_file(source, name, TEXT_LIMIT), target / name)


def with_dtype(config: PhiConfig, dtype: torch.dtype) -> PhiConfig:
    """``config`` recording ``dtype`` as the checkpoint's stored dtype."""
    return replace(config, torch_dtype=dtype_name(dtype))
