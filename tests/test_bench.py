"""`phi bench` end to end on a tiny checkpoint: table, JSON, CSV and PNG written, skipped backends explained."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from phi_cli.errors import DEBUG_HINT
from phi_cli.main import app
from phi_core.bench import run_benchmark
from phi_core.bench_models import SHAPES, random_model
from phi_core.bench_report import BenchSettings
from phi_core.kernels import choose
from phi_core.linear import packed_formats_available

ROW_FIELDS = {
    "implementation",
    "dtype",
    "decode_seconds",
    "decode_tokens",
    "decode_tokens_per_s",
    "weight_bytes_per_step",
    "weight_gb_per_s",
    "decode_vs_transformers_float32",
    "backend",
    "batch_size",
    "seconds",
    "median_s",
    "min_s",
    "max_s",
    "tokens",
    "tokens_per_s",
    "peak_memory_bytes",
    "attention_seconds",
    "attention_share",
    "skipped",
    "speedup_vs_eager",
}


def test_whole_pipeline_on_a_tiny_checkpoint(lm_checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    out_json, out_csv, png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "chart.png"
    args = [
        "bench",
        "-m",
        str(lm_checkpoint),
        "--seq-len",
        "16",
        "--batch-sizes",
        "1,2",
        "--repeats",
        "2",
        "--against",
        "transformers",
        "--output",
        str(out_json),
        "--output",
        str(out_csv),
        "--plot",
        str(png),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "vs eager" in result.stdout
    assert "skipped flash_attention_2: flash_attention_2 needs a CUDA device" in result.stderr
    report = json.loads(out_json.read_text())
    assert report["settings"]["seq_len"] == 16 and report["settings"]["batch_sizes"] == [1, 2]
    assert {"date", "torch", "cpu", "threads", "transformers", "flash_attn", "parameters"} <= report["metadata"].keys()
    rows = report["rows"]
    assert all(set(row) == ROW_FIELDS for row in rows)
    measured = [(r["implementation"], r["backend"], r["batch_size"]) for r in rows if not r["skipped"]]
    assert measured == [
        ("phi_core", "eager", 1),
        ("transformers", "eager", 1),
        ("phi_core", "sdpa", 1),
        ("transformers", "sdpa", 1),
        ("phi_core", "eager", 2),
        ("transformers", "eager", 2),
        ("phi_core", "sdpa", 2),
        ("transformers", "sdpa", 2),
    ]
    for row in rows:
        if row["skipped"]:
            assert row["backend"] == "flash_attention_2" and row["seconds"] == []
            continue
        assert len(row["seconds"]) == 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["tokens"] == 16 * row["batch_size"] and row["peak_memory_bytes"] > 0
    assert (
        next(r for r in rows if r["backend"] == "eager" and r["implementation"] == "phi_core")["speedup_vs_eager"]
        == 1.0
    )
    with out_csv.open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_mode_counts_new_tokens(lm_checkpoint):
    report = run_benchmark(
        BenchSettings(
            model=str(lm_checkpoint),
            backends=("sdpa",),
            seq_len=8,
            batch_sizes=(2,),
            mode="generate",
            new_tokens=5,
            warmup=0,
            repeats=1,
        )
    )
    (row,) = report.rows
    assert row.tokens == 10 and row.tokens_per_s > 0 and row.attention_seconds is None
    # The first new token of each row comes from the prefill: 4 decode steps of 2 rows.
    assert row.decode_tokens == 8 and len(row.decode_seconds) == 1
    # How the decode rate compares with the whole run's depends on the machine's load: not a test.
    assert 0 < row.decode_seconds[0] < row.seconds[0]
    assert row.decode_tokens_per_s == row.decode_tokens / row.decode_seconds[0]


@pytest.mark.skipif(not packed_formats_available(), reason="this torch build has no fbgemm")
def test_generate_mode_compares_dtypes_with_transformers(lm_checkpoint, pack_small_matrices):
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "-m",
            str(lm_checkpoint),
            "--mode",
            "generate",
            "--attn",
            "sdpa",
            "--seq-len",
            "4",
            "--new-tokens",
            "3",
            "--batch-sizes",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--dtype",
            "float32",
            "--dtype",
            "bfloat16",
            "--dtype",
            "int8",
            "--against",
            "transformers",
        ],
    )
    assert result.exit_code == 0, result.output
    for column in ("decode tok/s", "weights/step", "GB/s", "vs hf fp32"):
        assert column in result.stdout
    report = run_benchmark(
        BenchSettings(
            model=str(lm_checkpoint),
            backends=("sdpa",),
            seq_len=4,
            batch_sizes=(1,),
            mode="generate",
            new_tokens=3,
            dtypes=("float32", "int8", "bfloat16"),
            warmup=0,
            repeats=1,
            against_transformers=True,
        )
    )
    rows = {(r.implementation, r.dtype): r for r in report.rows}
    # transformers once per float dtype: int8 compares with float32's row.
    assert sorted(rows) == [
        ("phi_core", "bfloat16"),
        ("phi_core", "float32"),
        ("phi_core", "int8"),
        ("transformers", "bfloat16"),
        ("transformers", "float32"),
    ]
    linears = transformers_linears(lm_checkpoint)
    linear_params = sum(m.weight.numel() for m in linears)
    assert rows["phi_core", "float32"].weight_bytes_per_step == 4 * linear_params
    assert rows["transformers", "float32"].weight_bytes_per_step == 4 * linear_params
    assert rows["phi_core", "bfloat16"].weight_bytes_per_step == 2 * linear_params
    # A byte per weight and a scale per output row: float32 in phi_core's tiles, float64 in fbgemm's packing.
    scale_bytes = 4 if choose("int8").storage == "tiles-int8" else 8
    int8_bytes = linear_params + scale_bytes * sum(m.out_features for m in linears)
    assert rows["phi_core", "int8"].weight_bytes_per_step == int8_bytes
    for row in rows.values():
        assert row.weight_gb_per_s > 0
    assert report.decode_speedup(rows["transformers", "float32"]) == 1.0
    assert report.decode_speedup(rows["phi_core", "int8"]) > 0


def transformers_linears(folder):
    import transformers

    model = transformers.PhiForCausalLM.from_pretrained(folder)
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_only_backend_asked_for_that_cannot_run_is_an_error(lm_checkpoint):
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "-m",
            str(lm_checkpoint),
            "--attn",
            "flash_attention_2",
            "--dtype",
            "float16",
            "--seq-len",
            "8",
            "--batch-sizes",
            "1",
        ],
    )
    assert result.exit_code == 1
    assert result.stderr == f"error: flash_attention_2 needs a CUDA device, not cpu ({DEBUG_HINT})\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attn", "flex"], "--attn 'flex' is not a backend"),
        (["--batch-sizes", "1,x"], "comma-separated"),
        (["--batch-sizes", "0"], "positive"),
        (["--output", "r.txt"], "use a .json or .csv"),
        (["--shape", "phi-3"], "--shape"),
        (["--dtype", "float8"], "--dtype 'float8' is not a dtype"),
        (["--threads", "100000"], "'--threads'"),
        (["--output", "no/such/folder/r.json"], "--output no/such/folder/r.json: the folder no/such/folder does not"),
        (["--plot", "chart.txt"], "use a .png, .svg or .pdf"),
        (["--plot", "no/such/folder/chart.png"], "the folder no/such/folder does not exist"),
    ],
)
def test_bad_options(args, message, monkeypatch):
    # Checked before measuring: a file that cannot be written must not cost the whole sweep first.
    monkeypatch.setattr("phi_cli.bench.run_benchmark", lambda *a: pytest.fail("measured before checking options"))
    result = CliRunner().invoke(app, ["bench", "--quick", *args])
    assert result.exit_code == 2 and message in result.stderr


def test_plot_without_matplotlib_fails_before_measuring(monkeypatch, tmp_path):
    monkeypatch.setattr("phi_cli.bench.run_benchmark", lambda *a: pytest.fail("measured before checking options"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    result = CliRunner().invoke(app, ["bench", "--quick", "--plot", str(tmp_path / "chart.png")])
    assert result.exit_code == 1
    assert result.stderr == f"error: --plot needs matplotlib: pip install 'phi-toolkit[plot]' ({DEBUG_HINT})\n"


def test_bench_device_defaults_to_cpu_and_titles_say_which_layers(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    help_text = " ".join(CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "250"}).stdout.split())
    assert "cuda if available" not in help_text and "[default: cpu]" in help_text
    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, text, **kw: titles.append(text))
    args = ["--shape", "tiny", "--layers", "1", "--seq-len", "8", "--batch-sizes", "1", "--repeats", "2"]
    out, png = tmp_path / "r.json", tmp_path / "c.png"
    result = CliRunner().invoke(app, ["bench", *args, "--attn", "eager", "--output", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "1 of 4 layers (--layers)" in result.stdout
    meta = json.loads(out.read_text())["metadata"]
    assert titles == [
        "tiny: forward, seq 8, float32, 1 of 4 layers\n"
        f"random weights, {meta['cpu']}, {meta['threads']} threads, median of 2 runs"
    ]


def test_random_model_has_the_real_shape_in_the_target_dtype():
    model = random_model(
        SHAPES["phi-2"].__class__(**{**SHAPES["phi-2"].__dict__, "num_hidden_layers": 1}), torch.bfloat16, "cpu"
    )
    assert model.model.embed_tokens.weight.shape == (51200, 2560)
    assert model.config.rotary_dim == 32
    assert model.precision.weights == "bfloat16"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.fc1.stored_bytes() == 2560 * 10240 * 2
