"""Rows/s of the local mode against `--ray` with 1 and 2 replicas, and the fixed cost of starting Ray.

    flock /tmp/phi-bench.lock .venv/bin/python benchmarks/scale.py            # classify and generate
    flock /tmp/phi-bench.lock .venv/bin/python benchmarks/scale.py --task classify --rows 8000

Each configuration runs in a fresh Python process on the embedded models, over the same JSONL files of short texts:

- local: phi_core's batch loop in one process (what `phi classify --input` runs), torch's default threads (and
  "local 1 thread": one, like a replica of one CPU);
- ray NxK: phi_core.distributed.run_job on a new local Ray instance, N replicas of K CPUs (K torch threads) each.

Each configuration runs N rows, then 2N, for some rounds (medians). "Rows/s per replica at work" is rows over the
seconds the replicas spent on them (each replica times its calls; the local loop is one replica), the rate a
cluster multiplies (docs/scale.md); "job start" is the rest of a run of N rows (local: loading the model; Ray: a
job's indexing, its replicas starting and loading the model, the wait for the last item); "Ray start" is
`ray.init` of a new local instance; end to end is the 2N rows over everything, starts included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "for",
    "x",
    "in",
    "range",
    "print",
    "return",
    "the",
    "sum",
    "of",
    "two",
    "numbers",
    "def",
    "class",
    "import",
    "os",
    "path",
    "value",
    "total",
    "if",
    "else",
]
CONFIGS = ("local", "local 1 thread", "ray 1x1", "ray 2x1", "ray 1x2")


def write_input(path: Path, rows: int, field: str) -> None:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            out.write(json.dumps({field: " ".join(rng.choices(WORDS, k=rng.randint(4, 12))), "id": i}) + "\n")


def measure_local(task: str, sources: list[Path], batch_size: int, new_tokens: int) -> dict:
    """Load the model, then run phi_core's batch loop (what `phi classify/generate --input` runs) over each file."""
    import phi_core
    from phi_cli.io import read_jsonl
    from phi_core.checkpoint import resolve_source
    from phi_core.classify import classify
    from phi_core.completion import Completion, complete, completion_setup
    from phi_core.generation_config import GenerationOverrides
    from phi_core.records import classification_record, completion_record, json_line
    from phi_core.tasks import TASKS

    began = time.perf_counter()
    name = "causal-lm" if task == "generate" else "sequence-classification"
    model = phi_core.load_model(TASKS[name].embedded_default, name)
    tokenizer = phi_core.load_tokenizer(TASKS[name].embedded_default)
    folder = resolve_source(TASKS[name].embedded_default, None, weights=False)
    setup = completion_setup(folder, GenerationOverrides(do_sample=False, max_new_tokens=new_tokens))
    load_s = time.perf_counter() - began
    runs = []
    for source in sources:
        began = time.perf_counter()
        records = read_jsonl(str(source), "prompt" if task == "generate" else "text")
        with open(os.devnull, "w") as sink:
            if task == "generate":
                prompts = [r["prompt"] for r in records]
                for done in complete(model, tokenizer, prompts, setup.params, batch_size, setup.prompt_format):
                    if isinstance(done, Completion):
                        record = completion_record(records[done.index], done, model.precision.weights, setup)
                        sink.write(json_line(record) + "\n")
            else:
                for result in classify(model, tokenizer, [r["text"] for r in records], batch_size):
                    sink.write(json_line(classification_record(records[result.index], result)) + "\n")
        seconds = time.perf_counter() - began
        runs.append((len(records), seconds, seconds))
    return _result(runs, replicas=1, ray_start=0.0, load_s=load_s)


def measure_ray(task: str, sources: list[Path], batch_size: int, new_tokens: int, replicas: int, cpus: int) -> dict:
    """Start a local Ray instance, then run a job over each file (each job starts its own replicas)."""
    import logging

    import ray

    from phi_core.distributed import ClassifyJob, Cluster, GenerateJob, ModelSpec, run_job
    from phi_core.generation_config import GenerationOverrides

    began = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ray_start = time.perf_counter() - began
    overrides = GenerationOverrides(do_sample=False, max_new_tokens=new_tokens)
    job = ClassifyJob() if task == "classify" else GenerateJob(overrides)
    runs = []
    for source in sources:
        with tempfile.TemporaryDirectory() as folder:
            began = time.perf_counter()
            summary = run_job(job, ModelSpec(), str(source), f"{folder}/out", Cluster(None, replicas, cpus), batch_size)
            runs.append((summary.rows, time.perf_counter() - began, summary.busy_s))
    ray.shutdown()
    return _result(runs, replicas=replicas, ray_start=ray_start, load_s=0.0)


def _result(runs: list[tuple[int, float, float]], replicas: int, ray_start: float, load_s: float) -> dict:
    """From runs of N and 2N rows (rows, seconds, seconds of work summed over the replicas): the rate of one
    replica while it works (rows over its busy seconds), the fixed start of a job (its time beyond what its rows
    cost its replicas working in parallel), and end to end (the 2N rows over everything, starts included). Medians
    over the rounds."""
    sizes = sorted({rows for rows, _, _ in runs})
    median = {n: [statistics.median(r[k] for r in runs if r[0] == n) for k in (1, 2)] for n in sizes}
    work_rate = statistics.median(rows / busy for rows, _, busy in runs)
    small, large = sizes[0], sizes[-1]
    return {
        "rows_per_replica_s": round(work_rate, 1),
        "ray_start_s": round(ray_start, 2),
        "start_s": round(load_s + median[small][0] - small / (replicas * work_rate), 2),
        "end_to_end_rows_per_s": round(large / (ray_start + load_s + median[large][0]), 1),
    }


def run_one(args: argparse.Namespace) -> None:
    sources = [Path(p) for p in args.source.split(",")] * args.rounds  # N, 2N, N, 2N...
    if args.config.startswith("local"):
        if args.config == "local 1 thread":
            import torch

            torch.set_num_threads(1)
        result = measure_local(args.task, sources, args.batch_size, args.new_tokens)
    else:
        replicas, cpus = (int(n) for n in args.config.split()[1].split("x"))
        result = measure_ray(args.task, sources, args.batch_size, args.new_tokens, replicas, cpus)
    print(json.dumps(result))


def measure_driver(rows: int = 200_000) -> float:
    """Rows/s the driver takes in: counting each row and writing its record (a classify record of a short text)
    to a JSONL shard. Every row of a job passes through it, so it bounds a cluster's rate."""
    import pyarrow as pa

    from phi_core.distributed import _Counter, _ShardWriter, _take

    record = json.dumps({"text": "def add(a, b): return a + b  # the sum", "id": 0, "label": "code", "score": 0.99})
    table = pa.table({"file": ["in.jsonl"] * 1000, "row": list(range(1000)), "line": [1] * 1000,
                      "record": [record] * 1000, "error": pa.array([None] * 1000, pa.string()),
                      "seconds": [0.0] * 1000})  # fmt: skip
    from pyarrow import fs

    with tempfile.TemporaryDirectory() as folder:
        writer = _ShardWriter(fs.LocalFileSystem(), folder, "jsonl", 100_000)
        counter = _Counter(None)
        counter.start(rows, [f"in-{i}.jsonl" for i in range(rows // 1000)])
        began = time.perf_counter()
        for i in range(rows // 1000):
            _take(table.set_column(0, "file", pa.array([f"in-{i}.jsonl"] * 1000)), writer, counter, "fail")
        writer.finish({})
        return rows / (time.perf_counter() - began)


def warm_up() -> None:
    """Run each model once, so that phi's CPU kernels are compiled into the user's cache before any clock starts."""
    phi = Path(sys.executable).parent / "phi"
    subprocess.run([str(phi), "classify", "x", "--quiet"], capture_output=True, check=True)
    subprocess.run([str(phi), "generate", "x", "--max-new-tokens", "2", "--quiet"], capture_output=True, check=True)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "")
    level = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} CPUs, {level}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("classify", "generate", "both"), default="both")
    parser.add_argument("--rows", type=int, help="N: runs of N and 2N rows (default: 4000 classify, 120 generate)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each size per configuration (medians)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt (greedy)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="of: " + ", ".join(CONFIGS))
    parser.add_argument("--config", help=argparse.SUPPRESS)  # one measurement, in a child process
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        return run_one(args)
    warm_up()
    print(f"# {cpu_name()}; batch size {args.batch_size}; generate: {args.new_tokens} new tokens, greedy; "
          f"medians of {args.rounds} rounds; load average {os.getloadavg()[0]:.1f} at the start")  # fmt: skip
    print("| task | mode | rows | Ray start s | job start s | rows/s per replica at work | end to end rows/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for task in ("classify", "generate") if args.task == "both" else (args.task,):
        rows = args.rows or (4000 if task == "classify" else 120)
        with tempfile.TemporaryDirectory() as folder:
            sources = [Path(folder) / "n.jsonl", Path(folder) / "2n.jsonl"]
            write_input(sources[0], rows, "prompt" if task == "generate" else "text")
            write_input(sources[1], 2 * rows, "prompt" if task == "generate" else "text")
            for config in args.configs:
                child = [sys.executable, __file__, "--config", config, "--source", ",".join(map(str, sources))]
                child += ["--task", task, "--batch-size", str(args.batch_size), "--new-tokens", str(args.new_tokens)]
                child += ["--rounds", str(args.rounds)]
                done = subprocess.run(child, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"| {task} | {config} | failed: {done.stderr.strip().splitlines()[-1:]} ||||||", flush=True)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"| {task} | {config} | {rows} + {2 * rows} | {r['ray_start_s']} | {r['start_s']} | "
                      f"{r['rows_per_replica_s']} | {r['end_to_end_rows_per_s']} |", flush=True)  # fmt: skip
    print(f"\ndriver (counting and writing the records of all replicas): {measure_driver():,.0f} rows/s")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
