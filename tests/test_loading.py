"""Checkpoint loading: every weights format, and one clear CheckpointError for every broken input."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import phi_core
from phi_core import CheckpointError


def logits(model, length=8):
    ids = torch.arange(length)[None] % 300
    return model(ids).logits


def test_sharded_safetensors_and_bin_load_the_same_weights(make_checkpoint, tmp_path):
    reference, folder = make_checkpoint()
    expected = logits(phi_core.load_model(folder))
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert torch.allclose(logits(phi_core.load_model(sharded)), expected, atol=1e-6)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(folder / "config.json", pickled / "config.json")
    torch.save(load_file(folder / "model.safetensors"), pickled / "pytorch_model.bin")
    assert torch.allclose(logits(phi_core.load_model(pickled)), expected, atol=1e-6)


def test_bfloat16_on_cpu_packs_the_matrices_and_computes_in_float32(make_checkpoint, pack_small_matrices):
    _, folder = make_checkpoint()
    model = phi_core.load_model(folder, dtype="bfloat16")
    assert model.precision.weights == "bfloat16" and model.compute_dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(layer.self_attn.qkv_proj.packed is not None for layer in model.model.layers)
    assert logits(model).dtype == torch.float32


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        phi_core.load_model(tmp_path / "nope")


def test_no_weights_file(make_checkpoint):
    _, folder = make_checkpoint()
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        phi_core.load_model(folder)


def test_missing_config(make_checkpoint):
    _, folder = make_checkpoint()
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: no such file"):
        phi_core.load_model(folder)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"model_type": "llama", "hidden_size": 64}), "not a Phi checkpoint"),
        (json.dumps({"hidden_size": 65, "num_attention_heads": 4}), "hidden_size"),
        (json.dumps({"hidden_act": "swish"}), "hidden_act"),
    ],
)
def test_invalid_config(make_checkpoint, content, message):
    _, folder = make_checkpoint()
    (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message) as info:
        phi_core.load_model(folder)
    assert "config.json" in str(info.value)


def test_truncated_safetensors(make_checkpoint):
    _, folder = make_checkpoint()
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        phi_core.load_model(folder)


def test_garbage_safetensors(make_checkpoint):
    _, folder = make_checkpoint()
    (folder / "model.safetensors").write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        phi_core.load_model(folder)


def test_shape_mismatch_names_the_tensor(make_checkpoint):
    _, folder = make_checkpoint()
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.fc1.weight"] = torch.zeros(7, 64)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.fc1\.weight has shape \[7, 64\]"):
        phi_core.load_model(folder)


def test_missing_and_unexpected_keys_are_named(make_checkpoint):
    _, folder = make_checkpoint()
    weights = load_file(folder / "model.safetensors")
    del weights["model.final_layernorm.bias"]
    weights["model.extra.weight"] = torch.zeros(2)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing model\.final_layernorm\.bias; unexpected model\.extra"):
        phi_core.load_model(folder)


def test_missing_head_says_what_the_checkpoint_has(make_checkpoint):
    _, folder = make_checkpoint()  # a causal-LM checkpoint
    with pytest.raises(
        CheckpointError, match=r"has a causal-LM head \(lm_head.weight\), not the sequence-classification head"
    ):
        phi_core.load_model(folder, task="sequence-classification")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_malicious_bin_is_refused_without_running(make_checkpoint, tmp_path, monkeypatch):
    _, folder = make_checkpoint()
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": RunsCode()}, folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused to unpickle"):
        phi_core.load_model(folder)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_python_files_in_the_checkpoint_are_never_run(make_checkpoint, tmp_path, monkeypatch):
    _, folder = make_checkpoint()
    for name in ("modeling_phi.py", "configuration_phi.py", "__init__.py"):
        (folder / name).write_text("raise SystemExit('checkpoint code was executed')\n")
    raw = json.loads((folder / "config.json").read_text())
    raw["auto_map"] = {"AutoModelForCausalLM": "modeling_phi.PhiForCausalLM"}
    (folder / "config.json").write_text(json.dumps(raw))
    monkeypatch.syspath_prepend(str(folder))
    assert logits(phi_core.load_model(folder)).shape == (1, 8, 320)


def test_shard_index_naming_a_missing_file(make_checkpoint, tmp_path):
    reference, _ = make_checkpoint()
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="40KB")
    next(sharded.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="which is missing"):
        phi_core.load_model(sharded)


def test_unknown_task_dtype_and_backend(make_checkpoint):
    _, folder = make_checkpoint()
    with pytest.raises(ValueError, match="unknown task"):
        phi_core.load_model(folder, task="translation")
    with pytest.raises(ValueError, match="unknown dtype"):
        phi_core.load_model(folder, dtype="float8")
    with pytest.raises(phi_core.BackendUnavailableError, match="unknown attention backend"):
        phi_core.load_model(folder, attn="flex")


def test_flash_attention_on_cpu_is_an_error_not_a_fallback(make_checkpoint):
    _, folder = make_checkpoint()
    with pytest.raises(phi_core.BackendUnavailableError, match="needs a CUDA device"):
        phi_core.load_model(folder, attn="flash_attention_2", dtype="float16")


def test_hub_id_offline_and_not_cached_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="microsoft/phi-1_5"):
        phi_core.load_model("microsoft/phi-1_5")
