"""`--ray`: the one dispatch from generate, classify and tag to phi_core.distributed, with its progress on stderr."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from phi_cli import entry
from phi_cli.errors import UsageProblem, fail
from phi_cli.io import stderr
from phi_core.distributed import Cluster, Job, JobSummary, ModelSpec, run_job

LOG_EVERY_S = 10.0  # progress lines when stderr is a log file, not a terminal


@dataclass(frozen=True)
class RayRun:
    """The distributed options of one command line."""

    ray: bool
    address: str | None
    replicas: int | None
    cpus_per_replica: float
    gpus_per_replica: float
    output: str | None
    output_format: str | None
    on_error: str
    id_field: str | None
    force: bool

    @property
    def requested(self) -> bool:
        return self.ray or self.address is not None

    def check_local(self) -> None:
        """Without --ray, the options that only a distributed run reads are mistakes."""
        given = {
            "--output": self.output is not None,
            "--output-format": self.output_format is not None,
            "--on-error": self.on_error != "fail",
            "--id-field": self.id_field is not None,
            "--replicas": self.replicas is not None,
            "--force": self.force,
        }
        named = [name for name, present in given.items() if present]
        if named:
            raise UsageProblem(f"{', '.join(named)}: only for a distributed run (add --ray or --ray-address)")


def run_on_ray(
    job: Job, input_file: str | None, model: ModelSpec, run: RayRun, batch_size: int, quiet: bool, local_only: list[str]
) -> None:
    """Run ``job`` with phi_core.distributed and say how it went on stderr; an interrupted or failed run is one
    line that says how many rows were done (and that nothing was published)."""
    if local_only:
        raise UsageProblem(f"{', '.join(local_only)}: not with --ray (it reads --input and writes --output)")
    if input_file is None or input_file == "-":
        raise UsageProblem("--ray reads --input FILE|FOLDER|GLOB (a path every node sees, or a URI), not stdin")
    if run.output is None:
        raise UsageProblem("--ray writes a dataset folder: give --output DIR")
    cluster = Cluster(run.address, run.replicas, run.cpus_per_replica, run.gpus_per_replica)
    with _Reporter(quiet) as reporter:
        try:
            summary = run_job(job, model, input_file, run.output, cluster, batch_size, run.output_format,
                              run.on_error, run.id_field, run.force, reporter)  # fmt: skip
        except KeyboardInterrupt:
            reporter.stop()
            fail(f"interrupted {reporter.where()}; nothing was published", 130)
        except entry.Terminated as exc:
            reporter.stop()
            message, code = entry.ending(exc.signum)
            fail(f"{message} {reporter.where()}; nothing was published", code)
    if not quiet:
        _print_summary(summary)


class _RowsPerSecond(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.1f} rows/s" if task.speed else "")


class _Reporter:
    """Rows done and rows/s on stderr: a bar on a terminal, a line every LOG_EVERY_S seconds in a log file."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.done, self.total = quiet, 0, None
        self.bar: Progress | None = None
        self.task: Any = None
        self.began = self.logged = time.monotonic()

    def __enter__(self) -> _Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self.quiet:
            return
        if stderr.is_terminal:
            self._update_bar(done, total)
        elif done and (time.monotonic() - self.logged >= LOG_EVERY_S or done == total):
            self.logged = time.monotonic()
            rate = done / (self.logged - self.began)
            print(f"progress: {done} of {total} rows, {rate:.1f} rows/s", file=sys.stderr, flush=True)

    def _update_bar(self, done: int, total: int) -> None:
        if self.bar is None:
            columns = (TextColumn("rows"), BarColumn(), MofNCompleteColumn(), _RowsPerSecond(), TimeElapsedColumn())
            self.bar = Progress(*columns, console=stderr, transient=True, redirect_stdout=False)
            self.bar.start()
            self.task = self.bar.add_task("rows", total=total)
        self.bar.update(self.task, completed=done)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def where(self) -> str:
        if self.total is None:
            return "before any row was done"
        return f"after {self.done} of {self.total} rows"


def _print_summary(summary: JobSummary) -> None:
    errors = f", {summary.errors} bad rows in _errors.jsonl" if summary.errors else ""
    shards = f"{len(summary.files)} shard{'' if len(summary.files) == 1 else 's'}"
    replicas = f"{summary.replicas} replica{'' if summary.replicas == 1 else 's'}"
    stderr.print(
        f"{summary.written} of {summary.rows} rows written to {summary.output} ({shards}{errors}) "
        f"in {summary.seconds:.1f} s, {summary.rows_per_s:.1f} rows/s, {replicas} "
        f"({summary.rows_per_replica_s:.1f} rows/s each while working)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
