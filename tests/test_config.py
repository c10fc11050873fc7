"""Config reading: both transformers layouts, both remote-code layouts, and errors that name the field."""

from __future__ import annotations

import pytest

from phi_core import ConfigError, PhiConfig, RopeScaling
from phi_core.config import detect_config_format

# The published values (docs/formats.md, section 4.4), in the transformers 4.37 spelling.
PHI_1_5 = {
    "architectures": ["PhiForCausalLM"],
    "model_type": "phi",
    "vocab_size": 51200,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "gelu_new",
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attention_dropout": 0.0,
    "qk_layernorm": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.37.0",
    "use_cache": True,
    "initializer_range": 0.02,
    "bos_token_id": None,
    "eos_token_id": None,
}
PHI_2 = {
    **PHI_1_5,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "partial_rotary_factor": 0.4,
    "resid_pdrop": 0.1,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}
PHI_2_V5 = {
    k: v for k, v in PHI_2.items() if k not in ("rope_theta", "partial_rotary_factor", "rope_scaling", "torch_dtype")
}
PHI_2_V5 |= {
    "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.4, "rope_type": "default"},
    "dtype": "float16",
}
MIXFORMER_1_5 = {
    "_name_or_path": "phi-1.5",
    "architectures": ["MixFormerSequentialForCausalLM"],
    "model_type": "mixformer-sequential",
    "activation_function": "gelu_new",
    "architecture": {"block_cls": "parallel", "mixer": {}, "mlp": {"mlp_cls": "mlp"}},
    "embd_layer": "default",
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "n_embd": 2048,
    "n_head": 32,
    "n_inner": None,
    "n_layer": 24,
    "n_positions": 2048,
    "rotary_dim": 32,
    "tie_word_embeddings": False,
    "vocab_size": 51200,
    "torch_dtype": "float32",
    "transformers_version": "4.32.1",
    "phyagi_version": "0.0.4.dev",
}
PHI_MSFT_2 = {
    "activation_function": "gelu_new",
    "architectures": ["PhiForCausalLM"],
    "attn_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "flash_attn": False,
    "flash_rotary": False,
    "fused_dense": False,
    "img_processor": None,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05,
    "model_type": "phi-msft",
    "n_embd": 2560,
    "n_head": 32,
    "n_head_kv": None,
    "n_inner": None,
    "n_layer": 32,
    "n_positions": 2048,
    "resid_pdrop": 0.1,
    "rotary_dim": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.35.2",
    "vocab_size": 51200,
}


def test_phi_1_5_values():
    config = PhiConfig.from_dict(PHI_1_5)
    assert config == PhiConfig(torch_dtype="float16", id2label={0: "LABEL_0", 1: "LABEL_1"})
    assert (config.head_dim, config.rotary_dim, config.num_key_value_heads) == (64, 32, 32)
    assert config.ignored_keys == ()


def test_phi_2_reads_the_same_in_both_transformers_layouts():
    v4, v5 = PhiConfig.from_dict(PHI_2), PhiConfig.from_dict(PHI_2_V5)
    assert v4 == v5
    assert (v4.hidden_size, v4.head_dim, v4.rotary_dim, v4.eos_token_id) == (2560, 80, 32, 50256)


@pytest.mark.parametrize(
    ("raw", "layout"),
    [
        (MIXFORMER_1_5, "mixformer-sequential"),
        (PHI_MSFT_2, "phi-msft"),
        (PHI_2, "hf"),
        ({**PHI_MSFT_2, "model_type": "phi"}, "phi-msft"),
    ],
)
def test_format_is_detected_from_keys_not_model_type(raw, layout):
    assert detect_config_format(raw).name == layout


def test_remote_formats_translate_to_the_current_values():
    assert PhiConfig.from_dict(MIXFORMER_1_5) == PhiConfig(torch_dtype="float32")
    phi2 = PhiConfig.from_dict(PHI_MSFT_2)
    assert phi2 == PhiConfig.from_dict({**PHI_2, "bos_token_id": None, "eos_token_id": None})
    assert phi2.partial_rotary_factor == 0.4


def test_remote_vocab_padding_gqa_and_rotary_clamp():
    raw = {**PHI_MSFT_2, "vocab_size": 50295, "n_head_kv": 8, "rotary_dim": 4096}
    config = PhiConfig.from_dict(raw)
    assert config.vocab_size == 50304
    assert config.num_key_value_heads == 8
    assert config.rotary_dim == config.head_dim == 80


def test_rope_scaling_both_spellings():
    v4 = PhiConfig.from_dict({**PHI_1_5, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    v4b = PhiConfig.from_dict({**PHI_1_5, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    v5 = PhiConfig.from_dict(
        {
            **PHI_2_V5,
            "rope_parameters": {
                "rope_type": "dynamic",
                "factor": 2.0,
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        }
    )
    assert v4.rope_scaling == v4b.rope_scaling == v5.rope_scaling == RopeScaling("dynamic", 2.0)


def test_labels():
    config = PhiConfig.from_dict(
        {**PHI_1_5, "id2label": {"0": "neg", "1": "neu", "2": "pos"}, "problem_type": "multi_label_classification"}
    )
    assert config.num_labels == 3
    assert config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert PhiConfig.from_dict({**PHI_1_5, "num_labels": 4}).id2label[3] == "LABEL_3"


def test_unknown_keys_are_reported_not_silently_dropped():
    assert PhiConfig.from_dict({**PHI_1_5, "sliding_window": 4096}).ignored_keys == ("sliding_window",)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_size": "big"}, "hidden_size"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"hidden_act": "relu2"}, "hidden_act"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "yarn"),
        ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "factor"),
        ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
        ({"partial_rotary_factor": 0.01}, "rotary dimension"),
        ({"torch_dtype": "float8"}, "dtype"),
        ({"torch_dtype": "float16", "dtype": "bfloat16"}, "disagree"),
        ({"rope_parameters": {"rope_theta": 500.0}}, "rope_theta"),
        ({"eos_token_id": 99999}, "eos_token_id"),
        ({"id2label": {"0": "a", "2": "b"}}, "id2label"),
        ({"num_labels": 3, "id2label": {"0": "a"}}, "num_labels"),
        ({"problem_type": "ranking"}, "problem_type"),
        ({"n_embd": 2048}, "n_embd"),
        ({"qk_layernorm": "yes"}, "qk_layernorm"),
    ],
)
def test_bad_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        PhiConfig.from_dict({**PHI_1_5, **change})


def test_written_config_loads_in_transformers_with_the_same_values():
    transformers = pytest.importorskip("transformers")
    ours = PhiConfig.from_dict(
        {**PHI_2, "rope_scaling": {"type": "linear", "factor": 2.0}, "id2label": {"0": "a", "1": "b", "2": "c"}}
    )
    theirs = transformers.PhiConfig.from_dict(ours.to_hf_dict())
    assert PhiConfig.from_dict(theirs.to_dict()) == ours
