"""Distributed generate, classify and tag on Ray (phi_core.distributed, `--ray`): one local Ray instance for the
module, the embedded models, and the local mode's output as the oracle, row for row."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from phi_cli.main import app
from phi_core.distributed import (
    DIE_FILE_VARIABLE,
    ClassifyJob,
    Cluster,
    GenerateJob,
    JobFailed,
    ModelSpec,
    Replica,
    list_inputs,
    run_job,
)
from phi_core.generation_config import GenerationOverrides

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

WORDS = ["for", "x", "in", "range", "print", "return", "the", "sum", "of", "two", "numbers", "def", "class", "import"]
WORDS += ["os", "path", "value", "total", "if", "else"]
TIMING = ("prefill_s", "decode_s", "tokens_per_s")  # wall-clock fields of generate's records


@pytest.fixture(scope="module")
def die_file(tmp_path_factory):
    """A small local Ray instance for the whole module; yields the file whose presence kills one replica."""
    die = tmp_path_factory.mktemp("fault") / "die"
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    ray.init(
        num_cpus=2,
        object_store_memory=256 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env={"env_vars": {DIE_FILE_VARIABLE: str(die)}},
    )
    for number, handler in handlers.items():  # ray.init sets its own SIGTERM handler; the other tests keep theirs
        signal.signal(number, handler)
    yield die
    ray.shutdown()


def texts(count: int, field: str = "text", seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{field: " ".join(rng.choices(WORDS, k=rng.randint(2, 10))), "id": i} for i in range(count)]


def write_jsonl(path: Path, records: list[dict], blank_every: int = 0) -> Path:
    lines = []
    for i, record in enumerate(records):
        lines.append(json.dumps(record))
        if blank_every and i % blank_every == 0:
            lines.append("   ")  # blank lines are no records, locally or on Ray
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def local(args: list[str]) -> list[dict]:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def on_ray(args: list[str], replicas: int = 2) -> str:
    """Run a command with --ray on the module's Ray instance (the connection this process holds); its stderr."""
    result = CliRunner().invoke(app, [*args, "--ray", "--replicas", str(replicas)])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    return result.stderr


def published(folder: Path) -> list[dict]:
    """The records of a published dataset folder, after checking its manifest."""
    manifest = json.loads((folder / "_SUCCESS").read_text())
    records = []
    for entry in manifest["files"]:
        lines = (folder / entry["name"]).read_text(encoding="utf-8").splitlines()
        assert len(lines) == entry["rows"]
        records += [json.loads(line) for line in lines]
    assert len(records) == manifest["written"]
    return records


def by_row(records: list[dict], path: Path) -> list[dict]:
    """Records in input order, without the position fields, after checking each row came exactly once."""
    rows = sorted(records, key=lambda r: r["_row"])
    assert [r["_row"] for r in rows] == list(range(len(rows)))
    assert {r["_file"] for r in rows} == {str(path)}
    return [{k: v for k, v in r.items() if k not in ("_row", "_file")} for r in rows]


def without_timing(records: list[dict], also: tuple[str, ...] = ()) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING + also} for r in records]


def test_classify_on_ray_writes_what_the_local_mode_prints(die_file, tmp_path):
    source = write_jsonl(tmp_path / "texts.jsonl", texts(3000), blank_every=97)
    expected = local(["classify", "--input", str(source), "--json", "--top-k", "2"])
    said = on_ray(["classify", "--input", str(source), "--top-k", "2", "--output", str(tmp_path / "out")])
    assert "3000 of 3000 rows written" in said
    records = published(tmp_path / "out")
    assert records == sorted(records, key=lambda r: r["_row"])  # shards in input order
    assert by_row(records, source) == expected


def test_every_row_exactly_once_when_a_replica_dies(die_file, tmp_path):
    source = write_jsonl(tmp_path / "texts.jsonl", texts(2000, seed=1))
    die_file.touch()  # the first replica to finish an item deletes it and dies inside its next one
    summary = run_job(ClassifyJob(), ModelSpec(), str(source), str(tmp_path / "out"), Cluster(replicas=2))
    assert not die_file.exists(), "no replica died"
    assert summary.written == 2000
    assert len(by_row(published(tmp_path / "out"), source)) == 2000


def test_list_inputs_folders_globs_and_hidden_files(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.jsonl", "a/2.parquet", "a/_errors.jsonl", "a/.hidden.jsonl", "a/notes.txt", "b.jsonl"):
        (tmp_path / name).write_text("")
    assert list_inputs(str(tmp_path / "a")) == [
        (f"{tmp_path}/a/1.jsonl", "jsonl"),
        (f"{tmp_path}/a/2.parquet", "parquet"),
    ]
    assert list_inputs(str(tmp_path / "*.jsonl")) == [(f"{tmp_path}/b.jsonl", "jsonl")]
    assert list_inputs(str(tmp_path / "a/notes.txt")) == [(str(tmp_path / "a/notes.txt"), "jsonl")]
    with pytest.raises(Exception, match="not found"):
        list_inputs(str(tmp_path / "missing.jsonl"))


def test_generate_on_ray_samples_what_the_local_mode_samples(die_file, tmp_path):
    # each engine batch is seeded alike, so sampling matches only if Ray's batches hold the local mode's rows
    source = write_jsonl(tmp_path / "prompts.jsonl", texts(160, field="prompt", seed=2), blank_every=31)
    args = ["--max-new-tokens", "4", "--seed", "7", "--batch-size", "4"]
    expected = local(["generate", "--input", str(source), *args])
    on_ray(["generate", "--input", str(source), *args, "--output", str(tmp_path / "out")])
    records = by_row(published(tmp_path / "out"), source)
    assert without_timing(records) == without_timing(expected)
    assert records[0]["generation"]["do_sample"] == {"value": True, "from": "checkpoint"}


SPECULATION = ("speculation",)  # what a run proposed and accepted: its planner decides by measured pass times


def copying(count: int, seed: int = 0) -> list[dict]:
    """Prompts that start a function again, which greedy decoding continues by copying: prompt lookup proposes."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        name, (a, b) = rng.choice(WORDS), rng.sample(WORDS, 2)
        rows.append({"prompt": f"def {name}({a}, {b}):\n    return {a} + {b}\n\n\ndef {name}(", "id": i})
    return rows


def test_generate_on_ray_with_prompt_lookup_writes_plain_greedy_output(die_file, tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", copying(16, seed=8))
    args = ["--greedy", "--repetition-penalty", "1", "--max-new-tokens", "12", "--batch-size", "4"]
    expected = local(["generate", "--input", str(source), *args])
    out = str(tmp_path / "out")
    on_ray(["generate", "--input", str(source), *args, "--lookup", "4", "--output", out], replicas=1)  # one item
    records = by_row(published(tmp_path / "out"), source)
    assert without_timing(records, SPECULATION) == without_timing(expected)
    assert {r["speculation"]["method"] for r in records} == {"prompt lookup, up to 4 tokens"}
    assert sum(r["speculation"]["accepted"] for r in records) > 0 and "speculation" not in expected[0]


def test_a_replica_with_a_draft_writes_plain_greedy_output(tmp_path, monkeypatch):
    """--draft with --ray: each replica (here one, in this process: the actor's code without the actor) loads the
    draft beside its model and generates what the local mode prints without one."""
    import numpy

    from phi_core.speculative import Planner

    source = write_jsonl(tmp_path / "prompts.jsonl", copying(3, seed=9))
    args = ["--greedy", "--max-new-tokens", "8", "--batch-size", "2"]
    expected = local(["generate", "--input", str(source), *args])
    overrides = GenerationOverrides(do_sample=False, max_new_tokens=8)
    job = GenerateJob(overrides, draft="int8", draft_tokens=3)
    phi_log = logging.getLogger("phi_core")
    level, threads = phi_log.level, torch.get_num_threads()
    try:
        replica = Replica(job, ModelSpec(), batch_size=2, threads=threads, id_field=None)
    finally:  # a replica quiets phi_core's notices for its worker's log
        phi_log.setLevel(level)
    item = {"path": str(source), "format": "jsonl", "first_row": 0, "count": 3}
    item |= {"start": 0, "end": source.stat().st_size, "first_line": 1}
    # the draft proposes at every step (the planner would find that an int8 copy of this tiny model never pays)
    monkeypatch.setattr(Planner, "plan", lambda self, available: min(self.most, max(available, default=0)))
    table = replica({key: numpy.array([value]) for key, value in item.items()})
    records = [json.loads(line) for line in table.column("record").to_pylist()]
    assert without_timing(by_row(records, source), SPECULATION) == without_timing(expected)
    assert records[0]["speculation"]["method"] == "draft int8 copy, up to 3 tokens"
    assert all(r["speculation"]["proposed"] > 0 for r in records)


def test_tag_on_ray_writes_what_the_local_mode_prints(die_file, tmp_path):
    source = write_jsonl(tmp_path / "texts.jsonl", texts(1000, seed=3))
    expected = local(["tag", "--input", str(source), "--json", "--aggregate", "first"])
    on_ray(["tag", "--input", str(source), "--aggregate", "first", "--output", str(tmp_path / "out")])
    assert by_row(published(tmp_path / "out"), source) == expected


BAD_ROWS = [
    ('{"id": 1}', "expected an object with a string 'text'"),  # missing field
    ('{"text": 5}', "expected an object with a string 'text'"),  # wrong type
    ('{"text": "' + "x " * 1100 + '"}', "tokens; the model's context is"),  # too long without --truncate
    ("{not json", "invalid JSON"),
]


def bad_file(path: Path) -> Path:
    """100 good rows, with the bad rows at lines 11, 31, 51 and 71."""
    lines = [json.dumps(r) for r in texts(100, seed=4)]
    for k, (bad, _) in enumerate(BAD_ROWS):
        lines.insert(10 + 20 * k, bad)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_bad_row_fails_the_job_naming_file_and_line(die_file, tmp_path):
    source = bad_file(tmp_path / "bad.jsonl")
    with pytest.raises(JobFailed, match=rf"{source} line 11: expected an object with a string 'text'.* of 104 rows"):
        run_job(ClassifyJob(), ModelSpec(), str(source), str(tmp_path / "out"), Cluster(replicas=1))
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # no output, no staging folder


def test_on_error_skip_writes_bad_rows_to_the_errors_file(die_file, tmp_path):
    source = bad_file(tmp_path / "bad.jsonl")
    cluster = Cluster(replicas=1)
    summary = run_job(ClassifyJob(), ModelSpec(), str(source), str(tmp_path / "out"), cluster, on_error="skip")
    assert (summary.rows, summary.written, summary.errors) == (104, 100, 4)
    errors = [json.loads(line) for line in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()]
    assert [(e["file"], e["row"], e["line"]) for e in errors] == [
        (str(source), 10 + 20 * k, 11 + 20 * k) for k in range(4)
    ]
    for error, (_, reason) in zip(errors, BAD_ROWS, strict=True):
        assert reason in error["reason"]
    records = published(tmp_path / "out")
    assert sorted(r["id"] for r in records) == list(range(100))
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert (manifest["rows"], manifest["written"], manifest["errors"]) == (104, 100, 4)


def test_parquet_folder_in_parquet_out_with_an_id_field(die_file, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "in").mkdir()
    rows = texts(300, seed=5)
    for part in range(3):
        table = pa.Table.from_pylist(rows[part * 100 : (part + 1) * 100])
        pq.write_table(table, tmp_path / "in" / f"part-{part}.parquet", row_group_size=40)
    summary = run_job(
        ClassifyJob(),
        ModelSpec(),
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        Cluster(replicas=2),
        id_field="id",
        shard_rows=128,
    )
    assert summary.files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    records = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["id"] for r in records) == list(range(300))
    assert "_row" not in records[0]  # the id field identifies the rows
    # a file's rows are batched from its own start, so scores may differ from one local run in the last digit
    expected = {r["id"]: r for r in local_classify(tmp_path, rows)}
    for record in records:
        assert record["label"] == expected[record["id"]]["label"]
        assert record["score"] == pytest.approx(expected[record["id"]]["score"], abs=1e-5)


def local_classify(tmp_path: Path, rows: list[dict]) -> list[dict]:
    return local(["classify", "--input", str(write_jsonl(tmp_path / "local.jsonl", rows)), "--json"])


def test_an_existing_output_is_refused_unless_forced(die_file, tmp_path):
    source = write_jsonl(tmp_path / "texts.jsonl", texts(20))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("")
    with pytest.raises(Exception, match="already exists"):
        run_job(ClassifyJob(), ModelSpec(), str(source), str(tmp_path / "out"), Cluster(replicas=1))
    run_job(ClassifyJob(), ModelSpec(), str(source), str(tmp_path / "out"), Cluster(replicas=1), force=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["_SUCCESS", "part-00000.jsonl"]


PHI = Path(sys.executable).parent / "phi"


@pytest.mark.parametrize(
    ("how", "send", "code", "said"),
    [("--ray-address", signal.SIGINT, 130, "interrupted"), ("--ray", signal.SIGTERM, 143, "terminated by SIGTERM")],
)
def test_an_interrupted_job_publishes_nothing_and_says_how_far_it_got(die_file, tmp_path, how, send, code, said):
    if not PHI.exists():
        pytest.skip(f"no console script at {PHI}: pip install -e . first")
    source = write_jsonl(tmp_path / "prompts.jsonl", texts(2000, field="prompt", seed=6))
    where = [how, ray.get_runtime_context().gcs_address] if how == "--ray-address" else [how, "--replicas", "1"]
    args = [str(PHI), "generate", "--input", str(source), "--output", str(tmp_path / "out"), *where]
    process = subprocess.Popen([*args, "--max-new-tokens", "16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size for p in tmp_path.glob(".out.*.partial/part-*")):  # some rows are written
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        process.send_signal(send)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    last = err.decode().strip().splitlines()[-1]
    assert process.returncode == code, err.decode()
    found = re.fullmatch(rf"error: {said} after (\d+) of 2000 rows; nothing was published", last)
    assert found and int(found[1]) > 0, last
    assert os.listdir(tmp_path) == ["prompts.jsonl"]  # no output folder, no staging folder


def test_replicas_that_a_new_local_instance_cannot_fit_are_an_error(tmp_path):
    if not PHI.exists():
        pytest.skip(f"no console script at {PHI}: pip install -e . first")
    source = write_jsonl(tmp_path / "texts.jsonl", texts(10))
    args = [str(PHI), "classify", "--input", str(source), "--ray", "--replicas", "64", "--output", str(tmp_path / "o")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert (
        done.stderr.strip().splitlines()[-1].startswith("error: 64 replicas need 64 CPUs and 0 GPUs; the Ray cluster")
    )
    assert os.listdir(tmp_path) == ["texts.jsonl"]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["classify", "x", "--ray", "--output", "o"], "TEXTS: not with --ray"),
        (["generate", "--input", "p.jsonl", "--ray", "--echo", "--output", "o"], "--echo: not with --ray"),
        (
            ["generate", "--input", "p.jsonl", "--ray", "--lookup", "2", "--draft", "int8", "--output", "o"],
            "choose one",
        ),
        (["tag", "--input", "-", "--ray", "--output", "o"], "not stdin"),
        (["tag", "--input", "t.jsonl", "--ray"], "give --output DIR"),
        (["classify", "--input", "t.jsonl", "--output", "o", "--on-error", "skip"], "--output, --on-error: only for"),
        (["generate", "--input", "p.jsonl", "--replicas", "2"], "--replicas: only for a distributed run"),
    ],
)
def test_options_that_do_not_go_together_are_usage_errors(args, said):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert said in result.stderr
