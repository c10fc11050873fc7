"""`phi convert`: every old layout, built here from a tiny transformers model by an independent reverse mapping,
converts to a checkpoint that transformers loads with the same logits; no code from the source ever runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import hf_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import phi_core
from phi_cli.main import app
from phi_core.convert import parse_size

LOUD = "raise RuntimeError('code from the checkpoint was executed')\n"


def remote_config(model, layout: str) -> dict:
    c = model.config
    raw = {
        "n_embd": c.hidden_size,
        "n_head": c.num_attention_heads,
        "n_layer": c.num_hidden_layers,
        "n_inner": c.intermediate_size,
        "n_positions": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "rotary_dim": int(c.hidden_size // c.num_attention_heads * c.rope_parameters["partial_rotary_factor"]),
        "layer_norm_epsilon": c.layer_norm_eps,
        "activation_function": "gelu_new",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    if layout == "A":
        raw |= {
            "model_type": "mixformer-sequential",
            "architectures": ["MixFormerSequentialForCausalLM"],
            "architecture": {"block_cls": "parallel", "mixer": {}, "mlp": {"mlp_cls": "mlp"}},
            "auto_map": {"AutoModelForCausalLM": "modeling_mixformer_sequential.MixFormerSequentialForCausalLM"},
        }
    else:
        kv = c.num_key_value_heads
        raw |= {
            "model_type": "phi-msft",
            "architectures": ["PhiForCausalLM"],
            "flash_attn": False,
            "n_head_kv": None if kv == c.num_attention_heads else kv,
            "auto_map": {"AutoModelForCausalLM": "modeling_phi.PhiForCausalLM"},
        }
    return raw


def fused_qkv(sd: dict, prefix: str, suffix: str) -> torch.Tensor:
    return torch.cat([sd[f"{prefix}self_attn.{p}_proj.{suffix}"] for p in "qkv"])


def layout_a(model, mlp_names=("mlp.fc1", "mlp.fc2")) -> dict:
    sd, n = model.state_dict(), model.config.num_hidden_layers
    out = {"layers.0.wte.weight": sd["model.embed_tokens.weight"]}
    for i in range(n):
        src, dst = f"model.layers.{i}.", f"layers.{i + 1}."
        for p in ("weight", "bias"):
            out[f"{dst}ln.{p}"] = sd[f"{src}input_layernorm.{p}"]
            out[f"{dst}mixer.Wqkv.{p}"] = fused_qkv(sd, src, p)
            out[f"{dst}mixer.out_proj.{p}"] = sd[f"{src}self_attn.dense.{p}"]
            out[f"{dst}{mlp_names[0]}.{p}"] = sd[f"{src}mlp.fc1.{p}"]
            out[f"{dst}{mlp_names[1]}.{p}"] = sd[f"{src}mlp.fc2.{p}"]
        out[f"{dst}mixer.rotary_emb.inv_freq"] = torch.ones(4)  # early mixformer persisted this buffer
    for p in ("weight", "bias"):
        out[f"layers.{n + 1}.ln.{p}"] = sd[f"model.final_layernorm.{p}"]
        out[f"layers.{n + 1}.linear.{p}"] = sd[f"lm_head.{p}"]
    return out


def layout_b(model) -> dict:
    sd, n = model.state_dict(), model.config.num_hidden_layers
    out = {"transformer.embd.wte.weight": sd["model.embed_tokens.weight"]}
    for i in range(n):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}ln.{p}"] = sd[f"{src}input_layernorm.{p}"]
            out[f"{dst}mixer.Wqkv.{p}"] = fused_qkv(sd, src, p)
            out[f"{dst}mixer.out_proj.{p}"] = sd[f"{src}self_attn.dense.{p}"]
            out[f"{dst}mlp.fc1.{p}"] = sd[f"{src}mlp.fc1.{p}"]
            out[f"{dst}mlp.fc2.{p}"] = sd[f"{src}mlp.fc2.{p}"]
    for p in ("weight", "bias"):
        out[f"lm_head.ln.{p}"] = sd[f"model.final_layernorm.{p}"]
        out[f"lm_head.linear.{p}"] = sd[f"lm_head.{p}"]
    return out


def layout_c(model) -> dict:
    """transformers 4.36: one query_key_value whose rows go per head: [h0 q, h0 k, h0 v, h1 q, ...]."""
    sd, c = model.state_dict(), model.config
    heads, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    out = {}
    for key, value in sd.items():
        if "self_attn.k_proj" in key or "self_attn.v_proj" in key:
            continue
        if "self_attn.q_proj" in key:
            prefix, suffix = key.split("self_attn.q_proj.")
            fused = fused_qkv(sd, prefix, suffix)
            per_head = fused.reshape(3, heads, hd, *fused.shape[1:]).transpose(0, 1)
            out[f"{prefix}self_attn.query_key_value.{suffix}"] = per_head.reshape(fused.shape)
        else:
            out[key] = value
    return out


def write_old(folder: Path, tensors: dict, config: dict, fmt: str, code_files: tuple[str, ...]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name in code_files:
        (folder / name).write_text(LOUD)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    if fmt == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    elif fmt == "shards":
        names = sorted(tensors)
        halves = {
            "model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2 :],
        }
        for file, keys in halves.items():
            save_file({k: tensors[k] for k in keys}, folder / file)
        index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(tensors, folder / "model.safetensors")
    return folder


def c_config(model) -> dict:
    raw = model.config.to_dict()
    params = raw.pop("rope_parameters")
    raw |= {
        "rope_theta": params["rope_theta"],
        "partial_rotary_factor": params["partial_rotary_factor"],
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
    }
    raw.pop("num_key_value_heads")
    raw.pop("dtype", None)
    return raw


CASES = {
    "A-rotary-0.5-bin": ("A", dict(partial_rotary_factor=0.5), "bin", ("mlp.fc_in", "mlp.fc_out")),
    "A-rotary-0.4-bin": ("A", dict(hidden_size=80, partial_rotary_factor=0.4), "bin", ("mlp.mlp.fc1", "mlp.mlp.fc2")),
    "B-rotary-0.5-shards": ("B", dict(partial_rotary_factor=0.5), "shards", None),
    "B-rotary-0.4-shards": ("B", dict(hidden_size=80, partial_rotary_factor=0.4), "shards", None),
    "B-gqa-shards": ("B", dict(num_attention_heads=8, num_key_value_heads=2), "shards", None),
    "C-rotary-0.4-safetensors": ("C", dict(hidden_size=80, partial_rotary_factor=0.4), "single", None),
}


def build_old(tmp_path: Path, case: str):
    layout, overrides, fmt, mlp = CASES[case]
    model = hf_model(**overrides)
    if layout == "A":
        tensors, config, code = layout_a(model, mlp), remote_config(model, "A"), ("modeling_mixformer_sequential.py",)
    elif layout == "B":
        tensors, config, code = layout_b(model), remote_config(model, "B"), ("modeling_phi.py", "configuration_phi.py")
    else:
        tensors, config, code = layout_c(model), c_config(model), ("modeling_phi.py",)
    return model, write_old(tmp_path / "old", tensors, config, fmt, (*code, "__init__.py"))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.arange(20).reshape(2, 10) * 13 % 320


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_checkpoint_loads_in_transformers_with_same_logits(tmp_path, case, monkeypatch):
    import transformers

    original, source = build_old(tmp_path, case)
    monkeypatch.syspath_prepend(str(source))  # even importable, the checkpoint's code must not run
    out = tmp_path / "new"
    result = CliRunner().invoke(app, ["convert", str(source), str(out), "--verify"])
    assert result.exit_code == 0, result.output
    assert "verify: max |logit difference|" in result.stdout
    converted = transformers.PhiForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logits(converted, IDS) - logits(original, IDS)).abs().max() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi" and config["architectures"] == ["PhiForCausalLM"]
    assert (out / "generation_config.json").is_file()
    assert not list(out.glob("*.py"))


@pytest.mark.parametrize("case", ["A-rotary-0.5-bin", "B-gqa-shards", "C-rotary-0.4-safetensors"])
def test_load_model_reads_old_layouts_directly(tmp_path, case, caplog):
    original, source = build_old(tmp_path, case)
    ours = phi_core.load_model(source)
    assert (ours(IDS).logits - logits(original, IDS)).abs().max() <= 1e-4
    assert "converting in memory (`phi convert" in caplog.text


def test_round_trip_current_layout_with_dtype_and_shards(tmp_path, make_checkpoint):
    _, folder = make_checkpoint()
    out = tmp_path / "bf16"
    result = CliRunner().invoke(
        app, ["convert", str(folder), str(out), "--dtype", "bfloat16", "--max-shard-size", "40KB"]
    )
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    before = load_file(folder / "model.safetensors")
    after = {}
    for shard in shards:
        after |= load_file(out / shard)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == torch.bfloat16
        assert torch.equal(after[key], value.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = tmp_path / "again"
    assert CliRunner().invoke(app, ["convert", str(out), str(again)]).exit_code == 0
    assert all(torch.equal(load_file(again / "model.safetensors")[k], v) for k, v in after.items())


def test_unset_end_of_text_ids_are_filled_for_the_phi_vocabulary():
    from phi_core.convert import _fill_token_ids

    filled = _fill_token_ids(phi_core.PhiConfig.from_dict(remote_config(hf_model(vocab_size=51200), "B")))
    assert (filled.bos_token_id, filled.eos_token_id) == (50256, 50256)
    assert _fill_token_ids(phi_core.PhiConfig(vocab_size=320)).eos_token_id is None


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("two gigs")


def run(args):
    return CliRunner().invoke(app, ["convert", *args])


def test_missing_source(tmp_path):
    result = run([str(tmp_path / "nope"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "no such folder" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unrecognized_layout_names_the_keys(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    save_file({"encoder.block.0.weight": torch.zeros(2)}, folder / "model.safetensors")
    result = run([str(folder), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "unrecognized checkpoint layout; keys seen: encoder.block.0.weight" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_config(tmp_path):
    _, source = build_old(tmp_path, "C-rotary-0.4-safetensors")
    (source / "config.json").unlink()
    result = run([str(source), str(tmp_path / "out")])
    assert result.exit_code == 1 and "config.json: no such file" in result.stderr


def test_unknown_key_is_named(tmp_path):
    original = hf_model()
    tensors = layout_b(original) | {"transformer.h.0.mixer.extra.weight": torch.zeros(3)}
    source = write_old(tmp_path / "old", tensors, remote_config(original, "B"), "single", ())
    result = run([str(source), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "unknown key 'transformer.h.0.mixer.extra.weight' for the phi-msft layout" in result.stderr


def test_wrong_qkv_shape_is_named(tmp_path):
    original = hf_model()
    tensors = layout_b(original)
    tensors["transformer.h.1.mixer.Wqkv.weight"] = torch.zeros(10, 64)
    source = write_old(tmp_path / "old", tensors, remote_config(original, "B"), "single", ())
    result = run([str(source), str(tmp_path / "out")])
    assert result.exit_code == 1 and "transformer.h.1.mixer.Wqkv.weight has shape [10, 64]" in result.stderr


def test_config_and_weights_disagree(tmp_path):
    original = hf_model()
    source = write_old(tmp_path / "old", layout_b(original), c_config(original), "single", ())
    result = run([str(source), str(tmp_path / "out")])
    assert result.exit_code == 1 and "weights are in the phi-msft layout" in result.stderr


def test_existing_output_is_kept_without_force(tmp_path, make_checkpoint):
    _, folder = make_checkpoint()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run([str(folder), str(out)])
    assert result.exit_code == 1 and "already exists (use --force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert run([str(folder), str(out), "--force"]).exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_failed_write_leaves_no_output(tmp_path, make_checkpoint, monkeypatch):
    _, folder = make_checkpoint()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(phi_core.convert, "save_file", disk_full)
    result = run([str(folder), str(tmp_path / "out")])
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no OUTPUT, no staging folder left


def test_bad_shard_size_is_a_usage_error(tmp_path, make_checkpoint):
    _, folder = make_checkpoint()
    result = run([str(folder), str(tmp_path / "out"), "--max-shard-size", "huge"])
    assert result.exit_code == 2 and "cannot read size 'huge'" in result.stderr
