"""Generation defaults from a checkpoint's generation_config.json (or old config.json keys), resolved like
transformers: with no overrides, phi_core generates the tokens of transformers' ``model.generate(input_ids)``."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import hf_model

import phi_core
from phi_core.errors import ConfigError
from phi_core.generation import generate
from phi_core.generation_config import (
    GenerationDefaults,
    GenerationOverrides,
    generation_defaults,
    resolve_generation,
)

VOCAB = 50304
PROMPT = [4299, 12900, 261, 44456, 7, 77, 2599]  # "def fibonacci(n):"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer_dir):
    """A random causal LM with the real tokenizer's files; each test rewrites its generation_config.json."""
    import shutil

    reference = hf_model(vocab_size=VOCAB, eos_token_id=50256, bos_token_id=50256, seed=7)
    folder = tmp_path_factory.mktemp("genconf")
    reference.save_pretrained(folder)
    for item in tokenizer_dir.iterdir():
        shutil.copyfile(item, folder / item.name)
    return folder


def with_generation_config(folder, settings):
    (folder / "generation_config.json").write_text(json.dumps(settings))
    return folder


def transformers_tokens(folder):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
    return out[0, len(PROMPT) :].tolist()


def our_tokens(folder, overrides=GenerationOverrides()):
    model, tokenizer = phi_core.load_model(folder), phi_core.load_tokenizer(folder)
    params = resolve_generation(overrides, generation_defaults(folder)).params
    return [event.token_id for event in generate(model, tokenizer, [PROMPT], params)]


def greedy_run(folder, count):
    return our_tokens(with_generation_config(folder, {"max_new_tokens": count, "eos_token_id": 50256}))


@pytest.mark.parametrize(
    "settings",
    [
        {"repetition_penalty": 1.3, "max_new_tokens": 10},
        {"max_new_tokens": 7},
        {"do_sample": False, "top_k": 5, "max_length": 15},  # top_k does nothing when not sampling
        {"do_sample": True, "top_k": 1, "temperature": 0.7, "max_new_tokens": 9},  # any seed: one candidate
    ],
    ids=["repetition-penalty", "max-new-tokens", "greedy-with-top-k-and-max-length", "sampling-top-k-1"],
)
def test_no_overrides_generate_what_transformers_generates(model_folder, settings):
    folder = with_generation_config(model_folder, {"bos_token_id": 50256, "eos_token_id": 50256, **settings})
    assert our_tokens(folder) == transformers_tokens(folder)


def test_a_list_of_eos_ids_stops_at_any_of_them(model_folder):
    third = greedy_run(model_folder, 6)[2]
    folder = with_generation_config(model_folder, {"eos_token_id": [50256, third], "max_new_tokens": 6})
    tokens = our_tokens(folder)
    assert tokens == transformers_tokens(folder)
    assert tokens[-1] == third and len(tokens) <= 3


def test_old_config_json_generation_keys_are_read_without_a_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "max_length": 30, "eos_token_id": 7}))
    defaults = generation_defaults(tmp_path)
    assert (defaults.max_length, defaults.eos_token_id) == (30, (7,))


def test_flags_override_each_setting():
    defaults = GenerationDefaults(
        do_sample=True, temperature=0.5, top_k=3, top_p=0.8, min_p=0.1, repetition_penalty=1.2, max_new_tokens=9
    )
    flags = GenerationOverrides(
        temperature=0.9, top_k=7, top_p=0.95, min_p=0.05, repetition_penalty=1.4, max_new_tokens=4, seed=3
    )
    resolved = resolve_generation(flags, defaults)
    sampling = resolved.params.sampling
    assert (sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p) == (0.9, 7, 0.95, 0.05)
    assert (sampling.repetition_penalty, sampling.seed, resolved.params.max_new_tokens) == (1.4, 3, 4)
    overridden = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens", "seed")
    assert all(resolved.settings[name][1] == "flag" for name in overridden)
    only_checkpoint = resolve_generation(GenerationOverrides(), defaults)
    assert only_checkpoint.params.sampling.top_k == 3
    assert only_checkpoint.settings["top_k"] == (3, "checkpoint")


def test_temperature_zero_is_greedy_and_drops_the_sampling_settings():
    defaults = GenerationDefaults(do_sample=True, temperature=0.7, top_p=0.9)
    resolved = resolve_generation(GenerationOverrides(temperature=0.0), defaults)
    assert resolved.params.sampling.temperature == 0.0
    assert resolved.settings["do_sample"] == (False, "flag")
    assert "top_p" not in resolved.settings


def test_a_flag_temperature_turns_sampling_on_over_a_greedy_checkpoint():
    resolved = resolve_generation(GenerationOverrides(temperature=0.8), GenerationDefaults(do_sample=False))
    assert resolved.params.sampling.temperature == 0.8
    assert resolved.settings["top_k"] == (50, "default")  # transformers' fallback when sampling


def test_max_new_tokens_flag_wins_over_the_checkpoint_max_length():
    resolved = resolve_generation(GenerationOverrides(max_new_tokens=5), GenerationDefaults(max_length=100))
    assert (resolved.params.max_new_tokens, resolved.params.max_length) == (5, None)
    by_length = resolve_generation(GenerationOverrides(), GenerationDefaults(max_length=100)).params
    assert (by_length.new_token_limit(30), by_length.new_token_limit(120)) == (70, 1)


def test_report_names_every_origin():
    report = resolve_generation(GenerationOverrides(seed=1), GenerationDefaults(repetition_penalty=1.2)).report()
    assert report["repetition_penalty"] == {"value": 1.2, "from": "checkpoint"}
    assert report["max_new_tokens"] == {"value": 128, "from": "default"}
    assert report["seed"] == {"value": 1, "from": "flag"}


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"eos_token_id": [50256, -2]}, "eos_token_id"),
        ({"eos_token_id": []}, "eos_token_id"),
        ({"pad_token_id": 1.5}, "pad_token_id"),
    ],
)
def test_bad_values_are_one_line_errors_naming_file_and_key(tmp_path, settings, key):
    (tmp_path / "generation_config.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError) as error:
        generation_defaults(tmp_path)
    message = str(error.value)
    assert "generation_config.json" in message and key in message and "\n" not in message


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json: not valid JSON"):
        generation_defaults(tmp_path)


def test_settings_phi_does_not_implement_are_ignored_with_a_notice(tmp_path, caplog):
    (tmp_path / "generation_config.json").write_text(json.dumps({"num_beams": 4, "num_return_sequences": 1}))
    with caplog.at_level(logging.WARNING, logger="phi_core"):
        generation_defaults(tmp_path)
    assert "num_beams=4" in caplog.text
    assert "num_return_sequences" not in caplog.text


# The command line ---------------------------------------------------------------------------------------------
TEXT = "def fibonacci(n):"  # encodes to PROMPT


def phi_generate(folder, *flags):
    from typer.testing import CliRunner

    from phi_cli.main import app

    return CliRunner().invoke(app, ["generate", TEXT, "-m", str(folder), "--json", *flags])


@pytest.mark.parametrize(
    "settings",
    [
        {"repetition_penalty": 1.3, "max_new_tokens": 10},
        {"do_sample": False, "top_k": 5, "max_new_tokens": 6},
    ],
    ids=["repetition-penalty", "greedy-with-top-k"],
)
def test_phi_generate_with_no_flags_generates_what_transformers_generates(model_folder, settings):
    folder = with_generation_config(model_folder, {"eos_token_id": 50256, **settings})
    result = phi_generate(folder)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["tokens"] == transformers_tokens(folder)
    assert record["generation"]["max_new_tokens"] == {"value": settings["max_new_tokens"], "from": "checkpoint"}


def test_phi_generate_stops_at_a_checkpoint_eos_list(model_folder):
    third = greedy_run(model_folder, 6)[2]
    folder = with_generation_config(model_folder, {"eos_token_id": [50256, third], "max_new_tokens": 6})
    record = json.loads(phi_generate(folder).stdout)
    assert record["tokens"] == transformers_tokens(folder) and record["finish_reason"] == "eos"


def test_flags_override_the_checkpoint_on_the_command_line(model_folder):
    settings = {"repetition_penalty": 1.3, "max_new_tokens": 10, "eos_token_id": 50256}
    folder = with_generation_config(model_folder, settings)
    record = json.loads(phi_generate(folder, "--max-new-tokens", "3", "--repetition-penalty", "1.0").stdout)
    assert record["generation"]["repetition_penalty"] == {"value": 1.0, "from": "flag"}
    assert record["tokens"] == greedy_run(model_folder, 3)


def test_a_bad_checkpoint_value_is_one_line_on_the_command_line(model_folder):
    folder = with_generation_config(model_folder, {"temperature": "hot"})
    result = phi_generate(folder)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "generation_config.json: temperature" in result.stderr
