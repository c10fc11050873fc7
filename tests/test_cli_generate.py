"""`phi generate` through Typer's CliRunner: every input path, option and bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import phi_core
from phi_cli.errors import DEBUG_HINT
from phi_cli.main import app
from phi_core.generation import GenerationParams, SamplingParams, generate

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def run(runner, args, stdin=None):
    return runner.invoke(app, args, input=stdin)


def greedy_text(folder, prompt, n):
    model, tokenizer = phi_core.load_model(folder), phi_core.load_tokenizer(folder)
    events = list(generate(model, tokenizer, [tokenizer.encode(prompt)], GenerationParams(max_new_tokens=n)))
    return "".join(e.text for e in events), [e.token_id for e in events]


def test_help_lists_the_five_commands(runner):
    result = run(runner, ["--help"])
    assert result.exit_code == 0
    for name in ("generate", "classify", "tag", "convert", "bench"):
        assert name in result.output


def one_line(text: str) -> str:
    """Help text with the panels' borders and line wrapping taken out."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize(
    ("command", "notes"),
    [
        ([], ["--version"]),
        (
            ["generate"],
            [
                "[default: (the embedded model for the task)]",
                "[default: (auto on CPU, float16 on CUDA)]",
                "[default: (cuda if available, else cpu)]",
                "[default: (the checkpoint's max_new_tokens, else 128)]",
                "[default: (the checkpoint's chat template, else code)]",
            ],
        ),
        (["classify"], ["[default: (from the config: softmax, sigmoid if multi-label, none for regression)]"]),
        (["tag"], ["[default: (O)]", "[default: simple]"]),
        (["convert"], ["[default: keep]"]),
        (["bench"], ["[default: (every backend that can run here)]", "[default: cpu]", "[default: (float32 on CPU"]),
    ],
)
def test_help_keeps_every_default_note(runner, command, notes):
    # Rich markup used to eat "[default: ...]" written into help texts, leaving "precision ." behind.
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = one_line(result.stdout)
    assert not re.search(r"\S \.( |$)", text), text
    for note in notes:
        assert note in text


def test_no_help_text_loses_a_bracketed_note(runner):
    for name in sorted(typer.main.get_command(app).commands):  # every command, including ones added later
        text = one_line(runner.invoke(app, [name, "--help"], env={"COLUMNS": "250"}).stdout)
        assert not re.search(r"\S \.( |$)", text), (name, text)


def test_prompt_argument_prints_the_completion(runner, lm_checkpoint):
    result = run(runner, ["generate", "def f(x):", "-m", str(lm_checkpoint), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    text, _ = greedy_text(lm_checkpoint, "def f(x):", 6)
    assert result.stdout == text + "\n"


def test_echo_and_prompt_from_stdin(runner, lm_checkpoint):
    result = run(runner, ["generate", "-m", str(lm_checkpoint), "--max-new-tokens", "4", "--echo"], stdin="import os\n")
    assert result.exit_code == 0, result.output
    text, _ = greedy_text(lm_checkpoint, "import os\n", 4)
    assert result.stdout == "import os\n" + text + "\n"


def test_json_output_fields(runner, lm_checkpoint):
    result = run(runner, ["generate", "x = ", "-m", str(lm_checkpoint), "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    text, tokens = greedy_text(lm_checkpoint, "x = ", 5)
    assert record["prompt"] == "x = " and record["completion"] == text and record["tokens"] == tokens
    assert record["finish_reason"] == "length"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (
        len(phi_core.load_tokenizer(lm_checkpoint).encode("x = ")),
        5,
    )
    assert {"prefill_s", "decode_s", "tokens_per_s"} <= record.keys()


def test_jsonl_input_carries_fields_and_batches(runner, lm_checkpoint, tmp_path):
    lines = [{"prompt": p, "id": i} for i, p in enumerate(["a", "import sys", "def g():", "# hi"])]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    result = run(
        runner,
        ["generate", "--input", str(path), "-m", str(lm_checkpoint), "--max-new-tokens", "3", "--batch-size", "3"],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2, 3]
    for record in records:
        assert record["tokens"] == greedy_text(lm_checkpoint, record["prompt"], 3)[1]


def test_stop_string_and_stats(runner, lm_checkpoint):
    text, _ = greedy_text(lm_checkpoint, "x", 8)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    result = run(
        runner,
        ["generate", "x", "-m", str(lm_checkpoint), "--max-new-tokens", "8", "--stop", stop, "--json", "--stats"],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["finish_reason"] == "stop"
    assert record["completion"] == text[: text.find(stop)]
    assert "tokens/s" in result.stderr


def test_formats_wrap_the_prompt(runner, lm_checkpoint):
    result = run(
        runner, ["generate", "hi", "-m", str(lm_checkpoint), "--max-new-tokens", "2", "--format", "instruct", "--echo"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Instruct: hi\nOutput:")


def test_seeded_sampling_is_reproducible(runner, lm_checkpoint):
    args = [
        "generate",
        "x",
        "-m",
        str(lm_checkpoint),
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
        "--top-p",
        "0.95",
        "--top-k",
        "40",
        "--min-p",
        "0.01",
        "--repetition-penalty",
        "1.2",
        "--seed",
        "3",
        "--json",
    ]
    first, second = run(runner, args), run(runner, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["tokens"] == json.loads(second.stdout)["tokens"]


def test_truncate_left_keeps_the_end(runner, lm_checkpoint):
    long_prompt = "word " * 80  # the test model's context is 64 tokens
    result = run(
        runner,
        [
            "generate",
            long_prompt,
            "-m",
            str(lm_checkpoint),
            "--max-new-tokens",
            "4",
            "--json",
            "--truncate",
            "--ignore-eos",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_tokens"] == 60


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (["--max-new-tokens", "0", "x"], None, 2, "--max-new-tokens"),
        (["--attn", "flex", "x"], None, 2, "--attn"),
        (["--dtype", "float8", "x"], None, 2, "--dtype"),
        ([], "", 2, "the prompt is empty"),
        (["   "], None, 2, "the prompt is empty"),
        (["--input", "-"], '{"prompt": "ok"}\nnot json\n', 2, "stdin line 2: invalid JSON"),
        (["--input", "-"], '{"text": "no prompt"}\n', 2, "line 1: expected an object with a string 'prompt'"),
        (["--input", "/nonexistent.jsonl"], None, 2, "cannot be read"),
        (["x", "--input", "-"], "", 2, "not both"),
        (["x", "--max-new-tokens", "70"], None, 1, "exceeds the model's context of 64 tokens"),
        (["x", "--attn", "flash_attention_2", "--device", "cpu"], None, 1, "flash_attention_2 needs a CUDA device"),
        (["x", "--top-p", "1.5"], None, 2, "--top-p: 1.5 is not in (0, 1]"),
        (["x", "--repetition-penalty", "nan"], None, 2, "'--repetition-penalty': nan is not a finite number"),
        (["x", "--temperature", "inf"], None, 2, "'--temperature': inf is not a finite number"),
        (["x", "--top-p", "nan"], None, 2, "'--top-p'"),
        (["x", "--min-p", "-inf"], None, 2, "'--min-p'"),
        (["x", "--seed", str(2**64)], None, 2, "'--seed'"),
        (["x", "--seed", "-1"], None, 2, "'--seed'"),
        (["--input", "-"], b'{"prompt": "ok"}\n{"prompt": "\xff"}\n', 2, "stdin line 2: not valid UTF-8 (byte 0xff"),
        (["--input", "-"], '{"prompt": "\\ud800"}\n', 2, "stdin line 1: 'prompt' holds a lone surrogate"),
        (["-"], "", 2, "the prompt is empty"),
    ],
)
def test_bad_input_is_one_clear_line(runner, lm_checkpoint, args, stdin, code, message):
    result = run(runner, ["generate", "-m", str(lm_checkpoint), *args], stdin=stdin)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_sampling_params_refuse_nan_and_inf():
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        for value in (math.nan, math.inf):
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                SamplingParams(**{name: value})


def test_dash_reads_the_prompt_from_stdin(runner, lm_checkpoint):
    result = run(runner, ["generate", "-", "-m", str(lm_checkpoint), "--max-new-tokens", "2", "--json"], stdin="a\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] == "a\n"


def test_piped_stdin_comes_before_the_prompt_argument(runner, lm_checkpoint):
    args = ["generate", "def test_g():", "-m", str(lm_checkpoint), "--max-new-tokens", "2", "--json"]
    result = run(runner, args, stdin="def g():\n    pass\n\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] == "def g():\n    pass\n\ndef test_g():"


def test_undecodable_argument_bytes_become_replacement_characters(runner, lm_checkpoint):
    args = ["generate", "x = '\udcff'", "-m", str(lm_checkpoint), "--max-new-tokens", "2", "--json"]
    result = run(runner, args)  # what Python makes of the argv bytes "x = '\xff'"
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] == "x = '\ufffd'"
    assert result.stderr == "note: the prompt is not valid UTF-8; the bytes that are not were replaced by U+FFFD\n"
    assert run(runner, [*args, "--quiet"]).stderr == ""


def test_lone_surrogate_in_a_copied_field_is_written_as_an_escape(runner, lm_checkpoint):
    line = '{"prompt": "x", "note": "\\udc00"}\n'
    result = run(runner, ["generate", "--input", "-", "-m", str(lm_checkpoint), "--max-new-tokens", "1"], stdin=line)
    assert result.exit_code == 0, result.output
    assert "\\udc00" in result.stdout and json.loads(result.stdout)["note"] == "\udc00"


def test_empty_model_option_is_not_the_embedded_model(runner):
    result = run(runner, ["generate", "x", "-m", "", "--max-new-tokens", "2"])
    assert result.exit_code != 0
    assert result.stderr.startswith("error: ") and result.stdout == ""


def test_stats_add_up_the_batches(runner, lm_checkpoint, tmp_path):
    # Batches run one after another: tokens/s is all new tokens over the sum of the batches' decode times
    # (it used to divide by the longest single batch, overstating the rate).
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a", "b = 1", "import os", "def f():"]))
    args = ["generate", "--input", str(path), "-m", str(lm_checkpoint), "--max-new-tokens", "6", "--ignore-eos"]
    result = run(runner, [*args, "--batch-size", "2", "--stats"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    seconds = [r["decode_s"] for r in records]
    decode = max(seconds[:2]) + max(seconds[2:])  # a batch's clock runs until its last row is done
    found = re.search(r"(\d+) new tokens in ([\d.]+) s \(([\d.]+) tokens/s\)", result.stderr)
    assert found is not None, result.stderr
    assert int(found[1]) == 24
    assert float(found[2]) == pytest.approx(decode, abs=2e-3)
    # The seconds are printed rounded (to the last digit shown): the rate fits the interval they stand for.
    shown, half_digit = float(found[2]), 0.5 * 10 ** -len(found[2].partition(".")[2])
    assert 24 / (shown + half_digit) * 0.99 <= float(found[3]) <= 24 / max(shown - half_digit, 1e-9) * 1.01


def test_readme_python_example_prints_what_its_comment_says(capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S)[1]
    claimed = re.search(r"print\(model\(.*\)\.logits\.shape\)  # (.*)", code)[1]
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out.splitlines()[0] == claimed


def test_missing_model_folder_is_a_runtime_error(runner):
    result = run(runner, ["generate", "x", "-m", "./no/such/folder"])
    assert result.exit_code == 1
    assert result.stderr == f"error: ./no/such/folder: no such folder (and not a Hub repo id) ({DEBUG_HINT})\n"


def test_results_before_an_error_are_flushed(runner, lm_checkpoint, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "word " * 80}) + "\n")
    result = run(
        runner,
        ["generate", "--input", str(path), "-m", str(lm_checkpoint), "--max-new-tokens", "3", "--batch-size", "1"],
    )
    assert result.exit_code == 1
    assert json.loads(result.stdout.splitlines()[0])["prompt"] == "ok"
    assert "exceeds the model's context" in result.stderr


def test_float16_overflow_is_reported_not_printed(runner, lm_checkpoint, monkeypatch):
    original = phi_core.model.PhiForCausalLM.forward

    def overflowing(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits[...] = torch.inf
        return out

    monkeypatch.setattr(phi_core.model.PhiForCausalLM, "forward", overflowing)
    result = run(runner, ["generate", "x", "-m", str(lm_checkpoint), "--dtype", "float16", "--max-new-tokens", "2"])
    assert result.exit_code == 1
    assert "NaN/inf with float16 weights; run with --dtype float32" in result.stderr
    assert result.stdout == ""
