"""Hostile and broken checkpoints: each is built here and must give one clear one-line error, never read a file
outside the checkpoint, hang, exhaust memory, or destroy a folder. Every case calls phi_core directly."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import phi_core
import phi_core.convert
import phi_core.saving
from phi_core import CheckpointError, ConfigError, PhiError
from phi_core.checkpoint import resolve_source
from phi_core.convert import convert_checkpoint
from phi_core.files import TEXT_LIMIT, read_text_file
from phi_core.loading import check_device, check_tokenizer_fits
from phi_core.saving import atomic_folder, rename_new

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO read) or building 10**9 modules, should a check ever regress."""

    def expire(number: int, frame: object) -> None:
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def refused(match: str, kind: type[Exception] = CheckpointError) -> Iterator[None]:
    """The block raises ``kind`` with a one-line message matching ``match``, within a few seconds."""
    with pytest.raises(kind, match=match) as info, deadline(20):
        yield
    assert "\n" not in str(info.value)


def rewrite_config(folder: Path, **changes: object) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))


def rewrite_weights(folder: Path, **changes: torch.Tensor | None) -> None:
    weights = load_file(folder / "model.safetensors")
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del weights[name]
        else:
            weights[name] = value
    save_file(weights, folder / "model.safetensors")


def leftovers(parent: Path, *expected: Path) -> list[str]:
    """Entries of ``parent`` other than ``expected``: staging or set-aside folders a run left behind."""
    return sorted(p.name for p in parent.iterdir() if p not in expected)


# 1. The output never is the source, the current directory or one of its parents --------------------------------
def test_convert_into_the_current_directory_or_its_parent_is_refused(make_checkpoint, tmp_path, monkeypatch):
    _, folder = make_checkpoint()
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for output in (".", "..", str(work)):
        with refused("is the current directory or one of its parents"):
            convert_checkpoint(folder, output, force=True)
    assert (work / "notes.txt").read_text() == "mine"
    assert leftovers(work.parent, work) == []


@pytest.mark.parametrize("where", ["itself", "inside", "around"])
def test_output_that_is_holds_or_lies_inside_the_source_is_refused(make_checkpoint, tmp_path, where):
    _, folder = make_checkpoint()
    output = {"itself": folder, "inside": folder / "out", "around": tmp_path}[where]
    with refused("source checkpoint"):
        convert_checkpoint(folder, output, force=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


# 2. Every file read resolves inside the checkpoint; written files are never made more readable --------------------
def test_tokenizer_file_linking_outside_is_not_copied(make_checkpoint, tmp_path):
    _, folder = make_checkpoint()
    secret = tmp_path / "secret"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    (folder / "special_tokens_map.json").symlink_to(secret)
    with refused(r"special_tokens_map\.json: leads outside the checkpoint folder"):
        convert_checkpoint(folder, tmp_path / "out")
    assert leftovers(tmp_path, folder, secret) == []


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.json", "added_tokens.json"])
def test_tokenizer_reading_a_file_outside_is_refused(tmp_path, tokenizer_dir, name):
    folder = tmp_path / "ckpt"
    shutil.copytree(tokenizer_dir, folder)
    if name != "tokenizer.json":
        (folder / "tokenizer.json").unlink()  # so the vocab.json + merges.txt files are read
    (folder / name).unlink()
    (folder / name).symlink_to(tokenizer_dir / name)
    with refused(f"{name}: leads outside the checkpoint folder"):
        phi_core.load_tokenizer(folder)


def shard_elsewhere(folder: Path, tmp_path: Path, how: str) -> None:
    """Move the weights out of ``folder`` and point an index at them: absolute, with '..', or through a link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "model.safetensors").rename(outside / "model.safetensors")
    entry = {"absolute": str(outside / "model.safetensors"), "dotdot": "../outside/model.safetensors"}.get(how)
    if how == "link":
        entry = "model-00001-of-00001.safetensors"
        (folder / entry).symlink_to(outside / "model.safetensors")
    keys = load_file(outside / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, entry)}))


@pytest.mark.parametrize(
    ("how", "message"),
    [("absolute", "an absolute path; refused"), ("dotdot", "leads outside"), ("link", "leads outside")],
)
def test_shard_index_entry_outside_the_folder_is_refused(make_checkpoint, tmp_path, how, message):
    _, folder = make_checkpoint()
    shard_elsewhere(folder, tmp_path, how)
    with refused(message):
        phi_core.load_model(folder)
    with refused(message):
        convert_checkpoint(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_embedded_head_may_read_only_its_embedded_siblings(make_checkpoint, tmp_path):
    _, folder = make_checkpoint()
    for base in ("tiny", "other"):  # the heads share ../tiny/model.safetensors; nothing else beside them
        shutil.copytree(folder, tmp_path / base)
    head = tmp_path / "tiny-tagger"
    head.mkdir()
    shutil.copyfile(folder / "config.json", head / "config.json")
    keys = load_file(folder / "model.safetensors")
    for base, works in (("tiny", True), ("other", False)):
        index = {"weight_map": dict.fromkeys(keys, f"../{base}/model.safetensors")}
        (head / "model.safetensors.index.json").write_text(json.dumps(index))
        if works:
            phi_core.load_model(head)
        else:
            with refused(r"other/model\.safetensors: leads outside the checkpoint folder"):
                phi_core.load_model(head)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_checkpoint_file_linking_outside_is_refused(make_checkpoint, tmp_path, name):
    _, folder = make_checkpoint()
    (folder / name).rename(tmp_path / name)
    (folder / name).symlink_to(tmp_path / name)
    with refused(f"{name}: leads outside the checkpoint folder"):
        phi_core.load_model(folder)


def test_pickle_linking_outside_is_refused(make_checkpoint, tmp_path):
    _, folder = make_checkpoint()
    torch.save(load_file(folder / "model.safetensors"), tmp_path / "weights.bin")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").symlink_to(tmp_path / "weights.bin")
    with refused(r"pytorch_model\.bin: leads outside the checkpoint folder"):
        phi_core.load_model(folder)


def hub_cache(cache: Path, repo: str, folder: Path) -> Path:
    """``folder`` laid out as huggingface_hub caches a repo: snapshot files are links to ``../../blobs/HASH``."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for item in folder.iterdir():
        blob = repo_dir / "blobs" / hashlib.sha256(item.read_bytes()).hexdigest()
        shutil.copyfile(item, blob)
        (snapshot / item.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_hub_snapshot_links_into_the_cache_blobs_are_fine(make_checkpoint, tmp_path, tokenizer_dir):
    _, folder = make_checkpoint(vocab_size=50304)
    for item in tokenizer_dir.iterdir():
        shutil.copyfile(item, folder / item.name)
    snapshot = hub_cache(tmp_path / "hub", "org/tiny", folder)
    model = phi_core.load_model(snapshot)
    check_tokenizer_fits(model.config, phi_core.load_tokenizer(snapshot))
    convert_checkpoint(snapshot, tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_written_files_keep_the_permissions_they_were_made_with(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "out") as staging:
            os.close(os.open(staging / "private", os.O_CREAT | os.O_WRONLY, 0o600))
            (staging / "public").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "private").stat().st_mode) == 0o600  # not widened to the umask's 0644
    assert stat.S_IMODE((tmp_path / "out" / "public").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


# 3. Publishing never replaces an output that appeared meanwhile; --force swaps atomically -------------------------
@pytest.fixture(params=["renameat2", "mkdir-reservation"])
def rename_mode(request, monkeypatch) -> str:
    if request.param == "mkdir-reservation":
        monkeypatch.setattr(phi_core.saving, "_renameat2", None)
    elif phi_core.saving._renameat2 is None:
        pytest.skip("no renameat2 here")
    return request.param


def test_rename_new_never_replaces(tmp_path, rename_mode):
    for kind in ("full folder", "empty folder", "file"):
        source, target = tmp_path / "source", tmp_path / kind
        source.mkdir()
        if kind == "file":
            target.write_text("old")
        else:
            target.mkdir()
            if kind == "full folder":
                (target / "old").write_text("old")
        with pytest.raises(FileExistsError):
            rename_new(source, target)
        assert source.is_dir()
        source.rmdir()
    (tmp_path / "source").mkdir()
    rename_new(tmp_path / "source", tmp_path / "new")
    assert (tmp_path / "new").is_dir() and not (tmp_path / "source").exists()


def test_two_converts_into_one_output_one_of_them_fails(make_checkpoint, tmp_path, monkeypatch, rename_mode):
    _, first = make_checkpoint()
    _, second = make_checkpoint(seed=1)
    out = tmp_path / "out"
    write_config = phi_core.convert.write_config

    def racing_write_config(*args, **kwargs):
        monkeypatch.setattr(phi_core.convert, "write_config", write_config)
        convert_checkpoint(second, out)  # the other run finishes first
        write_config(*args, **kwargs)

    monkeypatch.setattr(phi_core.convert, "write_config", racing_write_config)
    with refused("appeared while writing; kept it"):
        convert_checkpoint(first, out)
    assert torch.equal(
        load_file(out / "model.safetensors")["lm_head.weight"],
        load_file(second / "model.safetensors")["lm_head.weight"],
    )
    assert leftovers(tmp_path, first, second, out) == []


def test_force_puts_the_old_output_back_when_publishing_fails(make_checkpoint, tmp_path, monkeypatch, rename_mode):
    _, folder = make_checkpoint()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def failing_publish(source: Path, target: Path) -> None:
        if source.name.endswith(".partial"):
            raise OSError(errno.EIO, "Input/output error")
        rename_new(source, target)

    monkeypatch.setattr(phi_core.saving, "rename_new", failing_publish)
    with refused(r"out: cannot be written \(\[Errno 5\] Input/output error\)"):
        convert_checkpoint(folder, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path, folder, out) == []
    monkeypatch.setattr(phi_core.saving, "rename_new", rename_new)
    convert_checkpoint(folder, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert leftovers(tmp_path, folder, out) == []


def test_sigterm_removes_the_staging_folder(tmp_path):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("a SIGTERM handler is already installed")
    with pytest.raises(SystemExit) as info, atomic_folder(tmp_path / "out") as staging:
        (staging / "model.safetensors").write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
    assert info.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# 4. float16 overflow and non-finite --verify results are errors -------------------------------------------------
def test_float16_overflow_names_the_tensor(make_checkpoint, tmp_path):
    _, folder = make_checkpoint()
    big = load_file(folder / "model.safetensors")["model.layers.0.mlp.fc1.weight"].clone()
    big[0, 0] = 1e6
    rewrite_weights(folder, model__layers__0__mlp__fc1__weight=big)
    with refused(r"model\.layers\.0\.mlp\.fc1\.weight: holds values up to 1e\+06, beyond float16's range"):
        convert_checkpoint(folder, tmp_path / "out", dtype="float16")
    assert leftovers(tmp_path, folder) == []
    convert_checkpoint(folder, tmp_path / "out", dtype="bfloat16")  # bfloat16 has float32's range


def test_verify_with_non_finite_logits_is_an_error(make_checkpoint, tmp_path):
    _, folder = make_checkpoint()
    rewrite_weights(folder, model__final_layernorm__weight=torch.full((64,), float("nan")))
    with refused(r"out: --verify found non-finite logits \(max \|logit difference\| = nan\)"):
        convert_checkpoint(folder, tmp_path / "out", verify=True)
    assert leftovers(tmp_path, folder) == []


# 5. A current-layout checkpoint is checked against its config before anything is written -----------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model__extra__weight": torch.zeros(2)}, r"weights do not fit the config: unexpected model\.extra\.weight"),
        (
            {"model__final_layernorm__bias": None},
            r"weights do not fit the config: missing model\.final_layernorm\.bias",
        ),
        ({"model__layers__1__mlp__fc1__weight": torch.zeros(7, 64)}, r"fc1\.weight has shape \[7, 64\]"),
    ],
)
def test_current_layout_is_checked_before_writing(make_checkpoint, tmp_path, change, message):
    _, folder = make_checkpoint()
    rewrite_weights(folder, **change)
    written = []
    with refused(message):
        convert_checkpoint(folder, tmp_path / "out", on_tensor=lambda name, size: written.append(name))
    assert written == [] and leftovers(tmp_path, folder) == []
    with refused(message):
        phi_core.load_model(folder)  # the same check


# 6. A failure to write is one line naming the output, and the staging folder goes -------------------------------
@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), SafetensorError("Error while serializing: I/O error")],
)
def test_write_failure_names_the_output_and_leaves_nothing(make_checkpoint, tmp_path, monkeypatch, error):
    _, folder = make_checkpoint()

    def failing_save_file(*args, **kwargs):
        raise error

    monkeypatch.setattr(phi_core.convert, "save_file", failing_save_file)
    with refused(f"{tmp_path / 'out'}: cannot be written"):
        convert_checkpoint(folder, tmp_path / "out")
    assert leftovers(tmp_path, folder) == []


# 7. Memory bombs: sizes checked against the weights' headers first; only regular files of sane size are read -----
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000, but the weights hold 2 layers"),
        ({"vocab_size": 10**9}, r"embed_tokens\.weight has shape \[320, 64\], but config\.json's vocab_size"),
    ],
)
def test_config_sizes_are_checked_against_the_weights_first(make_checkpoint, tmp_path, changes, message):
    _, folder = make_checkpoint()
    rewrite_config(folder, **changes)
    with refused(message):
        phi_core.load_model(folder)
    with refused(message):
        convert_checkpoint(folder, tmp_path / "out")


def test_label_counts_are_bounded_and_checked_against_the_head(make_checkpoint):
    _, folder = make_checkpoint("sequence-classification", num_labels=3)
    rewrite_config(folder, id2label=None, label2id=None, num_labels=10**9)
    with refused("num_labels must be between 1 and 100,000, got 1,000,000,000", ConfigError):
        phi_core.load_model(folder, task="sequence-classification")
    rewrite_config(folder, num_labels=5000)
    with refused(
        r"score\.weight has shape \[3, 64\], but config\.json's num_labels and hidden_size imply \[5000, 64\]"
    ):
        phi_core.load_model(folder, task="sequence-classification")


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def make_hostile(path: Path, kind: str) -> None:
    """Replace ``path`` by a link to /dev/zero, a named pipe, a folder, or a sparse file just over the limit."""
    path.unlink(missing_ok=True)
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.touch()
        os.truncate(path, TEXT_LIMIT + 1)


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("config.json", "dev-zero", "leads outside"),
        ("config.json", "fifo", "not a regular file"),
        ("config.json", "folder", "not a regular file"),
        ("config.json", "huge", "67,108,865 bytes, more than the 67,108,864 bytes such a file can need"),
        ("model.safetensors", "fifo", "not a regular file"),
        ("pytorch_model.bin", "fifo", "not a regular file"),
        ("pytorch_model.bin", "folder", "not a regular file"),
    ],
)
def test_only_regular_files_of_sane_size_are_read(make_checkpoint, tmp_path, name, kind, message):
    _, folder = make_checkpoint()
    if name == "pytorch_model.bin":
        (folder / "model.safetensors").unlink()
    make_hostile(folder / name, kind)
    with refused(f"{name}: .*{message}"):
        phi_core.load_model(folder)
    with refused(message):
        convert_checkpoint(folder, tmp_path / "out")


def test_the_text_reader_itself_refuses_devices_and_fifos(tmp_path):
    fifo(tmp_path / "pipe")
    for path in (Path("/dev/zero"), tmp_path / "pipe"):
        with refused("not a regular file"):
            read_text_file(path)
        with refused("not a regular file"):
            phi_core.PhiConfig.from_json_file(path)


def test_tokenizer_fifo_is_refused(tmp_path, tokenizer_dir):
    folder = tmp_path / "ckpt"
    shutil.copytree(tokenizer_dir, folder)
    fifo(folder / "tokenizer.json")
    with refused(r"tokenizer\.json: not a regular file"):
        phi_core.load_tokenizer(folder)


# 8. A device that does not exist here is one PhiError ---------------------------------------------------------
def test_unavailable_devices_are_one_line_errors(make_checkpoint, monkeypatch):
    _, folder = make_checkpoint()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with refused("device 'cuda': CUDA is not available", PhiError):
        phi_core.load_model(folder, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with refused(r"device 'cuda:3': no such device \(this machine has 1 cuda device", PhiError):
        phi_core.load_model(folder, device="cuda:3")
    with refused("device 'gpu': not a device name", PhiError):
        check_device("gpu")
    assert check_device("cpu") == torch.device("cpu")


# 9. The tokenizer's ids must fit the embedding --------------------------------------------------------------------
def test_tokenizer_with_more_ids_than_embedding_rows_is_refused(make_checkpoint, tokenizer_dir):
    from phi_cli.options import load_for_task

    tokenizer = phi_core.load_tokenizer(tokenizer_dir)
    with refused("tokenizer has 50295 ids but the model has only 320 embedding rows"):
        check_tokenizer_fits(phi_core.PhiConfig(vocab_size=320), tokenizer)
    for rows in (50295, 51200):  # as many rows as ids, or more (phi-2 pads to 51,200): fine
        check_tokenizer_fits(phi_core.PhiConfig(vocab_size=rows), tokenizer)
    _, folder = make_checkpoint()  # 320 rows
    for item in tokenizer_dir.iterdir():
        shutil.copyfile(item, folder / item.name)
    with refused("tokenizer has 50295 ids but the model has only 320 embedding rows"):
        load_for_task("causal-lm", str(folder), None, None, "sdpa", "cpu", quiet=True)


# 10. The Hub: the cache first; no network is one quick, quiet line ------------------------------------------------
@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch) -> Path:
    """A fresh cache and an endpoint where nothing listens (connection refused at once); never a real address."""
    import huggingface_hub.constants as constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads its environment once, at import: set what it read.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hf" / "hub"


@pytest.mark.parametrize("revision", [COMMIT, None])
def test_unreachable_hub_fails_quickly_and_quietly(unreachable_hub, capfd, revision):
    start = time.monotonic()
    with refused("microsoft/phi-2: not in the local Hugging Face cache, and the Hub cannot be reached"):
        resolve_source("microsoft/phi-2", revision)
    assert time.monotonic() - start < 5
    assert capfd.readouterr() == ("", "")


def test_cached_hub_repo_is_used_without_the_network(unreachable_hub, make_checkpoint, tokenizer_dir, capfd):
    _, folder = make_checkpoint()
    shutil.copyfile(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    snapshot = hub_cache(unreachable_hub, "org/tiny", folder)
    capfd.readouterr()  # transformers' progress bar from saving the checkpoint
    for revision in (None, COMMIT):
        assert resolve_source("org/tiny", revision) == snapshot
    assert phi_core.load_model("org/tiny").config.vocab_size == 320
    phi_core.load_tokenizer("org/tiny")
    assert capfd.readouterr() == ("", "")


# 11. The source: never empty; a folder that exists wins over an embedded name -----------------------------------
def test_empty_source_is_an_error():
    for source in ("", "  "):
        with refused("the model source is empty"):
            resolve_source(source)


def test_local_folder_shadows_the_embedded_name(make_checkpoint, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="phi_core")
    _, folder = make_checkpoint()
    monkeypatch.chdir(tmp_path)
    folder.rename(tmp_path / "tiny")
    assert resolve_source("tiny") == Path("tiny")
    assert "using the folder" in caplog.text and "not the embedded model 'tiny'" in caplog.text
    assert phi_core.load_model("tiny").config.vocab_size == 320  # the embedded tiny model has 51200
