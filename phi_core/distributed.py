"""Batch generate, classify and tag on a Ray cluster (the ``ray`` extra): JSONL or Parquet in, a dataset folder out.

The work is cut into *items*: runs of consecutive rows of one input file, each a whole number of engine batches
and starting at a multiple of the batch size, so that every engine batch holds the rows the local mode would put
in it (sampling with a seed, which seeds each batch, then gives the local mode's tokens). Ray Data sends the items
to a pool of replicas, actors that load the model once and run the same engine and the same record builders
(phi_core.records) as the local commands. Only the driver writes: it counts every (file, row) exactly once,
writes shards into a staging folder beside the output, and publishes it by an atomic no-replace rename only
once every row is accounted for, with a ``_SUCCESS`` manifest written last. A replica that dies has its items
retried by Ray; a failed or interrupted job leaves no output folder.

``ray`` is imported inside functions, so phi_core works without the extra.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import fnmatch
import json
import logging
import math
import os
import posixpath
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from phi_core.checkpoint import resolve_source
from phi_core.classify import ScoreFunction, classify
from phi_core.completion import Completion, complete, completion_setup
from phi_core.errors import PhiError
from phi_core.generation import fit_prompt
from phi_core.generation_config import GenerationOverrides
from phi_core.loading import check_tokenizer_fits, load_model, load_tokenizer
from phi_core.records import (
    BadRecord,
    check_record,
    classification_record,
    completion_record,
    is_blank,
    json_line,
    parse_record,
    tag_record,
)
from phi_core.saving import atomic_folder, checked_output
from phi_core.speculative import DEFAULT_DRAFT_TOKENS, load_draft
from phi_core.tagging import Aggregation, tag
from phi_core.tasks import TASKS

FileFormat = Literal["jsonl", "parquet"]
OnError = Literal["fail", "skip"]
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
ITEM_ROWS = 64  # rows per item, rounded up to whole batches: the unit of retry and of progress
SHARD_ROWS = 100_000  # rows per output shard
MANIFEST = "_SUCCESS"
ERRORS = "_errors.jsonl"  # '_' first: dataset readers (Ray Data, pyarrow, Spark) skip it, like _SUCCESS
# Test-only fault injection, inert unless set: a replica that finds this file after its first item deletes it
# and dies (os._exit) while working on the next one, so exactly one replica of a job dies, mid-run.
DIE_FILE_VARIABLE = "PHI_RAY_TEST_DIE_FILE"
log = logging.getLogger("phi_core")


class BadRowError(PhiError):
    """An input row the job cannot run (named by file and row), under ``on_error="fail"``."""


class JobFailed(PhiError):
    """A distributed job that stopped before publishing; the message says how many rows were done."""


@dataclass(frozen=True)
class ModelSpec:
    """The model options, resolved on each replica's node (its HF cache, its devices); None: the default."""

    source: str | None = None
    revision: str | None = None
    dtype: str | None = None
    attn: str = "sdpa"
    device: str | None = None


@dataclass(frozen=True)
class GenerateJob:
    """`phi generate` settings. Speculative decoding by prompt ``lookup`` of up to that many tokens, or with a
    ``draft`` model (``int8``, ``int4`` or a checkpoint every node sees) proposing up to ``draft_tokens``, which
    each replica loads once, beside its model."""

    overrides: GenerationOverrides = field(default_factory=GenerationOverrides)
    prompt_format: str | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    truncate: bool = False
    lookup: int = 0
    draft: str | None = None
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    task = "causal-lm"
    input_field = "prompt"


@dataclass(frozen=True)
class ClassifyJob:
    """`phi classify` settings."""

    top_k: int = 1
    all_scores: bool = False
    function: ScoreFunction | None = None
    truncate: bool = False
    task = "sequence-classification"
    input_field = "text"


@dataclass(frozen=True)
class TagJob:
    """`phi tag` settings."""

    aggregate: Aggregation = "simple"
    ignore_labels: tuple[str, ...] = ("O",)
    truncate: bool = False
    task = "token-classification"
    input_field = "text"


Job = GenerateJob | ClassifyJob | TagJob


@dataclass(frozen=True)
class Cluster:
    """Where and how wide: ``address`` None starts a local Ray instance sized to the machine ("auto": the cluster
    this machine belongs to); ``replicas`` None fills the cluster (its CPUs, or GPUs, per replica)."""

    address: str | None = None
    replicas: int | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0


@dataclass(frozen=True)
class JobSummary:
    rows: int
    written: int
    errors: int
    files: list[str]
    output: str
    seconds: float
    startup_s: float
    replicas: int
    busy_s: float  # the replicas' seconds of work, summed (reading, checking and running their rows)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_replica_s(self) -> float:
        """What one replica does in a second of work: the rate a cluster multiplies by its replicas."""
        return self.rows / self.busy_s if self.busy_s > 0 else 0.0


Progress = Callable[[int, int], None]  # (rows done, rows in all)


def run_job(
    job: Job,
    model: ModelSpec,
    inputs: str,
    output: str,
    cluster: Cluster | None = None,
    batch_size: int = 8,
    output_format: FileFormat | None = None,
    on_error: OnError = "fail",
    id_field: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    item_rows: int = ITEM_ROWS,
    shard_rows: int = SHARD_ROWS,
) -> JobSummary:
    """Run ``job`` over every row of ``inputs`` (a file, folder or glob, local or any pyarrow filesystem URI) and
    publish the records in the dataset folder ``output``. Uses the current Ray connection if there is one."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    cluster = cluster or Cluster()
    began = time.perf_counter()
    _require_ray()
    files = list_inputs(inputs)
    output_format = output_format or ("parquet" if all(f == "parquet" for _, f in files) else "jsonl")
    out = _Output(output, output_format, force, shard_rows)  # refuses an existing output before any work
    counter = _Counter(progress)
    with _ray_session(cluster.address) as startup_s:
        replicas = _replica_count(cluster, own_instance=startup_s is not None)
        try:
            items = _index(files, batch_size * max(1, math.ceil(item_rows / batch_size)))
            counter.start(sum(item["count"] for item in items), [path for path, _ in files])
            with out.staging() as writer:
                for table in _results(items, job, model, cluster, replicas, batch_size, id_field):
                    _take(table, writer, counter, on_error)
                counter.check_complete()
                written = writer.finish(_manifest(job, counter, files, output_format, time.perf_counter() - began))
        except Exception as exc:
            raise JobFailed(
                f"{_message(exc)} ({counter.done} of {counter.total_text} rows were done; nothing was published)"
            ) from None
    seconds = time.perf_counter() - began
    return JobSummary(
        counter.total, counter.written, counter.errors, written, output, seconds, startup_s or 0.0, replicas,
        counter.busy_s,
    )  # fmt: skip


def _require_ray() -> None:
    try:
        import pyarrow  # noqa: F401  (ray[data] brings it)
        import ray.data  # noqa: F401
    except ImportError:
        raise PhiError("distributed runs need Ray Data: pip install 'phi-toolkit[ray]'") from None


# ---- inputs -------------------------------------------------------------------------------------------------


def _filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local path or a URI such as s3://bucket/key."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), os.path.abspath(uri)
    return fs.FileSystem.from_uri(uri)


def _format_of(name: str) -> FileFormat | None:
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def list_inputs(inputs: str) -> list[tuple[str, FileFormat]]:
    """The input files, sorted, each with its format: ``inputs`` itself, the data files under a folder (names
    starting with '.' or '_' skipped, as dataset readers do), or the files a glob (``*``, ``?``, ``[...]``) matches."""
    from pyarrow import fs

    filesystem, path = _filesystem(inputs)
    scheme = inputs.split("://", 1)[0] + "://" if "://" in inputs else ""
    pattern = None
    if any(c in path for c in "*?["):
        pattern, path = path, _glob_root(path)
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise PhiError(f"{inputs}: not found")
    if info.type == fs.FileType.File and pattern is None:
        return [(inputs, _format_of(path) or "jsonl")]  # a file named on purpose is read whatever its name
    found = []
    for entry in filesystem.get_file_info(fs.FileSelector(path, recursive=True)):
        relative = posixpath.relpath(entry.path, path)
        hidden = any(part.startswith((".", "_")) for part in relative.split("/"))
        if entry.type != fs.FileType.File or hidden or _format_of(entry.path) is None:
            continue
        if pattern is None or _glob_match(entry.path, pattern):
            found.append((scheme + entry.path if scheme else entry.path, _format_of(entry.path)))
    if not found:
        raise PhiError(f"{inputs}: no .jsonl, .json, .ndjson or .parquet files")
    return sorted(found)


def _glob_match(path: str, pattern: str) -> bool:
    """Shell glob rules: ``*`` and ``?`` stay inside one folder name; ``**`` spans any number of folders."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern.replace("**/", "*").replace("**", "*"))
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted, strict=True))


def _glob_root(pattern: str) -> str:
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return "/".join(parts[:i]) or "/"
    return pattern


def _index(files: list[tuple[str, FileFormat]], item_rows: int) -> list[dict[str, Any]]:
    """The items of every file, found by Ray tasks (one per file) that read where the rows start."""
    import ray

    index = ray.remote(num_cpus=0.5, max_retries=3)(_index_file)
    found = ray.get([index.remote(path, file_format, item_rows) for path, file_format in files])
    return [item for items in found for item in items]


def _index_file(path: str, file_format: FileFormat, item_rows: int) -> list[dict[str, Any]]:
    if file_format == "parquet":
        return _index_parquet(path, item_rows)
    return _index_jsonl(path, item_rows)


def _item(path: str, file_format: str, first_row: int, count: int, **where: int) -> dict[str, Any]:
    return {
        "path": path,
        "format": file_format,
        "first_row": first_row,
        "count": count,
        "start": 0,
        "end": 0,
        "first_line": 0,
        **where,
    }


def _index_jsonl(path: str, item_rows: int) -> list[dict[str, Any]]:
    """Items of ``item_rows`` records (blank lines are no records) as byte ranges, with their first line number."""
    filesystem, local = _filesystem(path)
    items, offset, row, count, start, first_line = [], 0, 0, 0, 0, 0
    with _reading(path), filesystem.open_input_stream(local) as stream:
        for number, raw in enumerate(_raw_lines(stream), start=1):
            if not is_blank(raw, number == 1):
                if count == 0:
                    start, first_line = offset, number
                count += 1
                if count == item_rows:
                    items.append(
                        _item(path, "jsonl", row, count, start=start, end=offset + len(raw), first_line=first_line)
                    )
                    row, count = row + count, 0
            offset += len(raw)
    if count:
        items.append(_item(path, "jsonl", row, count, start=start, end=offset, first_line=first_line))
    return items


def _raw_lines(stream: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary stream, each with its newline (the last may have none)."""
    rest = b""
    while block := stream.read(chunk):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _index_parquet(path: str, item_rows: int) -> list[dict[str, Any]]:
    """Items of at most ``item_rows`` rows inside each row group (``start``: the group, ``end``: the row in it)."""
    import pyarrow.parquet as pq

    filesystem, local = _filesystem(path)
    items, row = [], 0
    with _reading(path), filesystem.open_input_file(local) as handle:
        metadata = pq.ParquetFile(handle).metadata
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            for offset in range(0, rows, item_rows):
                count = min(item_rows, rows - offset)
                items.append(_item(path, "parquet", row + offset, count, start=group, end=offset))
            row += rows
    return items


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise PhiError(f"{path}: cannot be read ({exc})") from None
    except Exception as exc:  # pyarrow's ArrowInvalid: not a Parquet file, for one
        raise PhiError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class _Row:
    row: int
    line: int | None  # JSONL line number; None for Parquet
    record: dict[str, Any] | None
    error: str | None


def read_item(item: dict[str, Any], field_name: str) -> list[_Row]:
    """The rows of one item, each its record or what is wrong with it."""
    if item["format"] == "parquet":
        return _read_parquet_item(item, field_name)
    filesystem, local = _filesystem(item["path"])
    with _reading(item["path"]), filesystem.open_input_file(local) as handle:
        handle.seek(item["start"])
        data = handle.read(item["end"] - item["start"])
    rows, row = [], item["first_row"]
    for number, raw in enumerate(data.split(b"\n"), start=item["first_line"]):
        if row == item["first_row"] + item["count"]:
            break
        if is_blank(raw, number == 1):
            continue
        try:
            rows.append(_Row(row, number, parse_record(raw, field_name, number == 1), None))
        except BadRecord as exc:
            rows.append(_Row(row, number, None, str(exc)))
        row += 1
    return rows


def _read_parquet_item(item: dict[str, Any], field_name: str) -> list[_Row]:
    import pyarrow.parquet as pq

    filesystem, local = _filesystem(item["path"])
    wanted, skip = [], item["end"]
    with _reading(item["path"]), filesystem.open_input_file(local) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096, row_groups=[item["start"]]):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            wanted.extend(batch.slice(skip, item["count"] - len(wanted)).to_pylist())
            skip = 0
            if len(wanted) == item["count"]:
                break
    rows = []
    for offset, values in enumerate(wanted):
        try:
            rows.append(_Row(item["first_row"] + offset, None, check_record(_jsonable(values), field_name), None))
        except BadRecord as exc:
            rows.append(_Row(item["first_row"] + offset, None, None, str(exc)))
    return rows


def _jsonable(value: Any) -> Any:
    """A Parquet value as JSON holds it: timestamps as ISO 8601, decimals as strings, bytes as text if UTF-8."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, decimal.Decimal | datetime.timedelta):
        return str(value)
    return str(value)


# ---- replicas -----------------------------------------------------------------------------------------------


class Replica:
    """One model on one Ray actor: ``__call__`` takes a batch of items and returns one row per input row."""

    def __init__(self, job: Job, model: ModelSpec, batch_size: int, threads: int, id_field: str | None) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        logging.getLogger("phi_core").setLevel(logging.ERROR)  # notices would only fill the worker logs
        self.job, self.batch_size, self.id_field = job, batch_size, id_field
        source = TASKS[job.task].embedded_default if model.source is None else model.source
        device = model.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = model.dtype or ("auto" if torch.device(device).type == "cpu" else "float16")
        resolved = ModelSpec(source, model.revision, dtype, model.attn, device)
        self.model = load_model(source, job.task, dtype, model.attn, device, model.revision)
        self.tokenizer = load_tokenizer(source, model.revision)
        check_tokenizer_fits(self.model.config, self.tokenizer)
        self.runner = _runner(job, self.model, self.tokenizer, resolved)
        self.calls = 0

    def __call__(self, batch: dict[str, Any]) -> Any:
        import pyarrow as pa

        began = time.perf_counter()
        columns: dict[str, list[Any]] = {"file": [], "row": [], "line": [], "record": [], "error": []}
        for i in range(len(batch["path"])):
            item = {key: _scalar(values[i]) for key, values in batch.items()}
            for row, record, error in self._run_item(item):
                columns["file"].append(item["path"])
                columns["row"].append(row.row)
                columns["line"].append(row.line)
                columns["record"].append(record)
                columns["error"].append(error)
        self._maybe_die()
        self.calls += 1
        # the seconds this call took, on its first row: their sum over a job is the replicas' busy time
        columns["seconds"] = [time.perf_counter() - began] + [0.0] * (len(columns["row"]) - 1)
        types = {"file": pa.string(), "row": pa.int64(), "line": pa.int64(), "record": pa.string()}
        types |= {"error": pa.string(), "seconds": pa.float64()}
        return pa.table({name: pa.array(values, types[name]) for name, values in columns.items()})

    def _run_item(self, item: dict[str, Any]) -> list[tuple[_Row, str | None, str | None]]:
        """(row, its JSON line or None, what is wrong with it or None) for each row of the item, in input order."""
        rows = read_item(item, self.job.input_field)
        errors = {row.row: row.error or self._problem(row.record) for row in rows}
        good = [row for row in rows if errors[row.row] is None]
        lines = {}
        if good:
            for row, record in zip(good, self.runner.records([row.record for row in good], self.batch_size),
                                   strict=True):  # fmt: skip
                position = {} if self.id_field else {"_file": item["path"], "_row": row.row}
                lines[row.row] = json_line({**record, **position})
        return [(row, lines.get(row.row), errors[row.row]) for row in rows]

    def _problem(self, record: dict[str, Any] | None) -> str | None:
        assert record is not None
        if self.id_field is not None and self.id_field not in record:
            return f"no {self.id_field!r} field (the --id-field)"
        return self.runner.problem(record[self.job.input_field])

    def _maybe_die(self) -> None:
        path = os.environ.get(DIE_FILE_VARIABLE)
        if path and self.calls >= 1:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # exactly one replica wins this
                os._exit(1)


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class _GenerateRunner:
    def __init__(self, job: GenerateJob, model: Any, tokenizer: Any, spec: ModelSpec) -> None:
        """``spec``: the model's options as this replica resolved them, which a draft is loaded with too (as
        ``phi generate --draft`` loads it)."""
        assert spec.source is not None and spec.dtype is not None and spec.device is not None
        folder = resolve_source(spec.source, spec.revision, weights=False)
        draft = None
        if job.draft is not None:
            draft = load_draft(
                job.draft, spec.source, tokenizer, job.draft_tokens, spec.dtype, spec.attn, spec.device, spec.revision
            )
        self.setup = completion_setup(
            folder, job.overrides, job.prompt_format, job.stop, job.ignore_eos, job.lookup, draft
        )
        self.job, self.model, self.tokenizer = job, model, tokenizer

    def problem(self, prompt: str) -> str | None:
        if not prompt.strip():
            return "the prompt is empty"
        ids = self.tokenizer.encode(self.setup.prompt_format.render_prompt(prompt, self.setup.special_tokens))
        params = self.setup.params
        try:
            fit_prompt(
                ids, params.new_token_limit(len(ids)), self.model.config.max_position_embeddings, self.job.truncate
            )
        except PhiError as exc:
            return str(exc)
        return None

    def records(self, records: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
        setup, out = self.setup, [{}] * len(records)
        prompts = [r["prompt"] for r in records]
        fmt, special = setup.prompt_format, setup.special_tokens
        for done in complete(
            self.model, self.tokenizer, prompts, setup.params, batch_size, fmt, self.job.truncate, special
        ):
            if isinstance(done, Completion):
                out[done.index] = completion_record(records[done.index], done, self.model.precision, setup)
        return out


class _TextRunner:
    """classify and tag: a text is a problem when empty, or longer than the context without --truncate."""

    def __init__(self, job: ClassifyJob | TagJob, model: Any, tokenizer: Any) -> None:
        self.job, self.model, self.tokenizer = job, model, tokenizer

    def problem(self, text: str) -> str | None:
        ids = self.tokenizer.encode(text)
        context = self.model.config.max_position_embeddings
        if not ids:
            return "the text is empty"
        if len(ids) > context and not self.job.truncate:
            return f"the text has {len(ids)} tokens; the model's context is {context} (use --truncate to cut it)"
        return None

    def records(self, records: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
        texts = [r["text"] for r in records]
        job = self.job
        if isinstance(job, ClassifyJob):
            results = classify(self.model, self.tokenizer, texts, batch_size, job.function, job.truncate)
            return [classification_record(records[r.index], r, job.top_k, job.all_scores) for r in results]
        results = tag(self.model, self.tokenizer, texts, job.aggregate, job.ignore_labels, batch_size, job.truncate)
        return [tag_record(records[r.index], r) for r in results]


def _runner(job: Job, model: Any, tokenizer: Any, spec: ModelSpec) -> Any:
    if isinstance(job, GenerateJob):
        return _GenerateRunner(job, model, tokenizer, spec)
    return _TextRunner(job, model, tokenizer)


# ---- the driver ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[float | None]:
    """The current Ray connection (yields None), else one made here and shut down at the end (yields the seconds it
    took to make).

    ray.init puts its own SIGTERM handler in place of the caller's (phi's, which unwinds the stack so that the
    staging folder is removed); the caller's handlers are put back."""
    import ray

    if ray.is_initialized():
        yield None
        return
    began = time.perf_counter()
    signals = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    main = threading.current_thread() is threading.main_thread()
    handlers = {number: signal.getsignal(number) for number in signals} if main else {}
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as exc:
        raise PhiError(f"cannot connect to the Ray cluster at {address}: {_message(exc)}") from None
    finally:
        for number, handler in handlers.items():
            if handler is not None:
                signal.signal(number, handler)
    try:
        yield time.perf_counter() - began
    finally:
        ray.shutdown()


def _replica_count(cluster: Cluster, own_instance: bool) -> int:
    """``cluster.replicas``, or as many as the cluster fits; replicas the cluster cannot fit are an error on the
    instance this job started, and a warning on an existing cluster (which may be autoscaling)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    replicas = cluster.replicas
    if replicas is None:
        fit = gpus // cluster.gpus_per_replica if cluster.gpus_per_replica > 0 else cpus // cluster.cpus_per_replica
        replicas = max(1, int(fit))
    need_cpus, need_gpus = replicas * cluster.cpus_per_replica, replicas * cluster.gpus_per_replica
    if need_cpus > cpus or need_gpus > gpus:
        text = f"{replicas} replicas need {need_cpus:g} CPUs and {need_gpus:g} GPUs; the Ray cluster has {cpus:g} and "
        text += f"{gpus:g}"
        if own_instance:
            raise PhiError(f"{text} (ask for fewer --replicas, --cpus-per-replica or --gpus-per-replica)")
        log.warning("%s: the job waits until the cluster has room for them", text)
    return replicas


def _results(
    items: list[dict[str, Any]],
    job: Job,
    model: ModelSpec,
    cluster: Cluster,
    replicas: int,
    batch_size: int,
    id_field: str | None,
) -> Iterator[Any]:
    """The replicas' output tables, in input order, as they come."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # progress is the caller's; failures raise
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # shards in input order: the same output every run
    if hasattr(context, "max_consecutive_actor_init_deaths"):
        context.max_consecutive_actor_init_deaths = 2  # a model that cannot load fails the job, soon
    if not items:
        return
    blocks = min(len(items), 20_000)  # an item a block where it can: retries and progress come per block
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        Replica,
        fn_constructor_kwargs={
            "job": job,
            "model": model,
            "batch_size": batch_size,
            "threads": int(cluster.cpus_per_replica),
            "id_field": id_field,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=cluster.cpus_per_replica,
        num_gpus=cluster.gpus_per_replica,
    )
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")


class _Counter:
    """Rows done, and proof that each row of each file came back exactly once."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.total, self.done, self.written, self.errors = 0, 0, 0, 0
        self.busy_s = 0.0  # the replicas' seconds of work on the rows that came back
        self.seen: dict[str, bytearray] = {}
        self.total_text = "?"

    def start(self, total: int, files: list[str]) -> None:
        self.total, self.total_text = total, str(total)
        self.seen = {path: bytearray() for path in files}
        if self.progress:
            self.progress(0, total)

    def count(self, path: str, row: int) -> None:
        seen = self.seen[path]
        if row >= len(seen):
            seen.extend(bytes(row + 1 - len(seen)))
        if seen[row]:
            raise PhiError(f"internal error: {path} row {row} came back twice")
        seen[row] = 1
        self.done += 1

    def report(self) -> None:
        if self.progress:
            self.progress(self.done, self.total)

    def check_complete(self) -> None:
        if self.done != self.total:
            raise PhiError(f"internal error: {self.total - self.done} rows never came back")


def _take(table: Any, writer: _ShardWriter, counter: _Counter, on_error: OnError) -> None:
    """Write one output table of the replicas: its records to the shards, its bad rows to the errors file."""
    names = ("file", "row", "line", "record", "error", "seconds")
    for path, row, line, record, error, seconds in zip(*(table.column(n).to_pylist() for n in names), strict=True):
        counter.count(path, row)
        counter.busy_s += seconds
        if error is None:
            writer.add(record)
            counter.written += 1
            continue
        where = f"{path} line {line}" if line is not None else f"{path} row {row + 1}"
        if on_error == "fail":
            counter.done -= 1
            raise BadRowError(f"{where}: {error}; --on-error skip would write it to {ERRORS} and go on")
        writer.error({"file": path, "row": row, "line": line, "reason": error})
        counter.errors += 1
    counter.report()


def _manifest(
    job: Job, counter: _Counter, files: list[tuple[str, FileFormat]], output_format: str, seconds: float
) -> dict[str, Any]:
    return {
        "task": job.task,
        "rows": counter.total,
        "written": counter.written,
        "errors": counter.errors,
        "format": output_format,
        "inputs": [path for path, _ in files],
        "seconds": round(seconds, 3),
    }


class _Output:
    """The output dataset folder: local folders are staged beside it and renamed into place; on a filesystem with
    no rename (object stores) the shards are written in place and ``_SUCCESS``, written last, marks it complete."""

    def __init__(self, output: str, output_format: str, force: bool, shard_rows: int) -> None:
        self.output, self.format, self.force, self.shard_rows = output, output_format, force, shard_rows
        self.local = "://" not in output or output.startswith("file://")
        if self.local:
            self.output = output.removeprefix("file://")
            checked_output(self.output, force)
        else:
            self.filesystem, self.path = _filesystem(output)
            from pyarrow import fs

            if self.filesystem.get_file_info(self.path).type != fs.FileType.NotFound and not force:
                raise PhiError(f"{output}: already exists (use --force to replace it)")

    @contextlib.contextmanager
    def staging(self) -> Iterator[_ShardWriter]:
        if self.local:
            from pyarrow import fs

            with atomic_folder(self.output, self.force) as folder:
                yield _ShardWriter(fs.LocalFileSystem(), str(folder), self.format, self.shard_rows)
            return
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_dir(self.path)
        self.filesystem.create_dir(self.path)
        try:
            yield _ShardWriter(self.filesystem, self.path, self.format, self.shard_rows)
        except BaseException:
            with contextlib.suppress(Exception):
                self.filesystem.delete_dir(self.path)
            raise


class _ShardWriter:
    """Shards ``part-00000.jsonl`` (or ``.parquet``) of at most ``shard_rows`` records, the errors file, and the
    manifest."""

    def __init__(self, filesystem: Any, folder: str, output_format: str, shard_rows: int) -> None:
        self.filesystem, self.folder, self.format, self.shard_rows = filesystem, folder, output_format, shard_rows
        self.files: list[dict[str, Any]] = []
        self.pending: list[str] = []
        self.stream: Any = None
        self.errors: Any = None

    def add(self, line: str) -> None:
        if self.format == "parquet":
            self.pending.append(line)
            if len(self.pending) == self.shard_rows:
                self._flush_parquet()
            return
        if self.stream is None:
            self.stream = self._open(f"part-{len(self.files):05d}.jsonl")
            self.files.append({"name": f"part-{len(self.files):05d}.jsonl", "rows": 0})
        self.stream.write((line + "\n").encode())
        self.files[-1]["rows"] += 1
        if self.files[-1]["rows"] == self.shard_rows:
            self.stream.close()
            self.stream = None

    def error(self, record: dict[str, Any]) -> None:
        if self.errors is None:
            self.errors = self._open(ERRORS)
        self.errors.write((json_line(record) + "\n").encode())

    def finish(self, manifest: dict[str, Any]) -> list[str]:
        """Close every file, then write the manifest (last: its presence says the folder is complete)."""
        if self.pending:
            self._flush_parquet()
        for stream in (self.stream, self.errors):
            if stream is not None:
                stream.close()
        self.stream = self.errors = None
        manifest = {**manifest, "files": self.files}
        with self._open(MANIFEST) as stream:
            stream.write((json.dumps(manifest, indent=2) + "\n").encode())
        return [entry["name"] for entry in self.files]

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"part-{len(self.files):05d}.parquet"
        table = pa.Table.from_pylist([json.loads(line) for line in self.pending])
        with self._open(name) as stream:
            pq.write_table(table, stream)
        self.files.append({"name": name, "rows": len(self.pending)})
        self.pending = []

    def _open(self, name: str) -> Any:
        return self.filesystem.open_output_stream(f"{self.folder}/{name}")


def _message(exc: BaseException) -> str:
    """One line for an error, looking through Ray's wrappers to the exception a task or replica raised."""
    seen = exc
    for _ in range(8):
        cause = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(seen, PhiError) or cause is None or cause is seen:
            break
        seen = cause
    if isinstance(seen, PhiError):
        return " ".join(str(seen).split())
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[-1] if text else ''}".rstrip(": ")
