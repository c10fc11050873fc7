"""Weight storage apart from compute: which precision each --dtype resolves to, and that the packed CPU formats
compute what transformers computes on the same (rounded) weights."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from typer.testing import CliRunner

import phi_core
from phi_cli.main import app
from phi_core import kernels
from phi_core.errors import PhiError
from phi_core.generation import GenerationParams, generate
from phi_core.linear import PhiLinear, packed_formats_available, quantize_rows
from phi_core.precision import choose_precision

needs_fbgemm = pytest.mark.skipif(not packed_formats_available(), reason="this torch build has no fbgemm")
needs_kernels = pytest.mark.skipif(
    kernels.library(kernels.cpu_info().level) is None, reason="phi_core's kernels cannot be compiled here"
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _pack_everything(pack_small_matrices: None) -> None:
    """The packed paths are what these tests check: the tiny test models' matrices are packed too."""


@pytest.fixture
def no_kernels(monkeypatch: pytest.MonkeyPatch):
    """phi_core's compiled kernels turned off, as on a machine without a compiler: torch's products serve."""
    monkeypatch.setenv("PHI_KERNELS", "0")
    kernels.library.cache_clear()
    yield
    kernels.library.cache_clear()


CPU_CHOICES = [
    # requested, checkpoint, weights, storage with phi_core's kernels, storage with torch's (fbgemm) products
    ("auto", F32, "float32", "dense", "dense"),
    ("auto", F16, "float16", "rows-f16", "fbgemm-fp16"),
    ("auto", BF16, "bfloat16", "rows-bf16", "fbgemm-fp16"),
    ("float32", F16, "float32", "dense", "dense"),
    ("bfloat16", F32, "bfloat16", "rows-bf16", "fbgemm-fp16"),
    ("float16", BF16, "float16", "rows-f16", "fbgemm-fp16"),
    ("int8", F16, "int8", "tiles-int8", "fbgemm-int8"),
    ("int4", F16, "int4", "tiles-int4", "tiles-int4"),
    (torch.bfloat16, F32, "bfloat16", "rows-bf16", "fbgemm-fp16"),
]


@needs_kernels
@pytest.mark.parametrize(("requested", "checkpoint", "weights", "storage", "fallback"), CPU_CHOICES)
def test_cpu_choices(requested, checkpoint, weights, storage, fallback):
    precision = choose_precision(requested, "cpu", checkpoint)
    assert (precision.weights, precision.weight_format, precision.compute) == (weights, storage, F32)


@needs_fbgemm
@pytest.mark.parametrize(("requested", "checkpoint", "weights", "storage", "fallback"), CPU_CHOICES)
def test_cpu_choices_without_kernels(no_kernels, requested, checkpoint, weights, storage, fallback):
    precision = choose_precision(requested, "cpu", checkpoint)
    assert (precision.weights, precision.weight_format, precision.compute) == (weights, fallback, F32)


def test_auto_never_picks_a_quantized_format():
    for checkpoint in (F32, F16, BF16, torch.int8, torch.uint8):
        assert choose_precision("auto", "cpu", checkpoint).weights in ("float32", "float16", "bfloat16")


def test_gpu_choices_keep_one_dtype_for_weights_and_compute():
    precision = choose_precision("auto", "cuda", F16)
    assert (precision.weights, precision.weight_format, precision.compute) == ("float16", "dense", F16)
    assert choose_precision("bfloat16", "cuda").compute == BF16
    with pytest.raises(PhiError, match="int8 runs on a CPU"):
        choose_precision("int8", "cuda")
    with pytest.raises(PhiError, match="int4 runs on a CPU"):
        choose_precision("int4", "cuda")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        choose_precision("float8", "cpu")


@needs_kernels
def test_describe_says_what_auto_picked_and_which_kernel_serves_it():
    level = kernels.cpu_info().level
    rounded = " (prompts' activations rounded to float16)" if level.startswith("avx512") else ""
    assert choose_precision("auto", "cpu", F16).describe() == (
        f"auto: float16 weights{rounded}, float32 compute; phi {level} f16"
    )
    assert choose_precision("float32", "cpu").describe().startswith(f"float32 weights and compute; phi {level} f32")
    int4 = choose_precision("int4", "cpu")
    assert int4.describe().startswith("int4 weights (a float16 scale per 64 inputs, activations quantized per call)")
    report = int4.kernels()
    assert report["storage"] == "tiles-int4" and report["decode"] == f"phi {level} q4" and report["group"] == 64


@needs_fbgemm
def test_describe_without_kernels(no_kernels):
    assert choose_precision("auto", "cpu", F16).describe() == (
        "auto: float16 weights (fbgemm packed), float32 compute; fbgemm fp16"
    )
    assert choose_precision("bfloat16", "cpu").describe() == (
        "bfloat16 weights, held as float16 (fbgemm packed), float32 compute; fbgemm fp16"
    )
    assert choose_precision("float32", "cpu").describe() == "float32 weights and compute"


def _rounding_inputs(ours: torch.nn.Module) -> tuple[set[str], torch.dtype | None]:
    """The names, in transformers' model, of the Linears whose inputs phi_core's products round in a prompt-sized
    product, and the dtype they round to (AVX-512 products of 16-bit weights; phi_core's fused qkv_proj is
    transformers' q_proj, k_proj and v_proj)."""
    rounded_to = ours.precision.rounded_activations()
    if rounded_to is None:
        return set(), None
    names = set()
    for name, module in ours.named_modules():
        if isinstance(module, PhiLinear) and module.weight_format in ("rows-bf16", "rows-f16"):
            stem, _, last = name.rpartition(".")
            parts = ("q_proj", "k_proj", "v_proj") if last == "qkv_proj" else (last,)
            names |= {f"{stem}.{part}" if stem else part for part in parts}
    return names, rounded_to


def _reference_logits(
    reference: torch.nn.Module,
    ids: torch.Tensor,
    dtype: torch.dtype,
    rounding: tuple[set[str], torch.dtype | None] = (set(), None),
) -> torch.Tensor:
    """transformers in float32 on the matrices rounded to ``dtype``, as phi_core stores them (the embedding and
    every Linear weight; LayerNorms and biases stay float32), and with the inputs of the Linears ``rounding`` names
    rounded to its dtype in products of ``kernels.ROUNDED_ROWS`` rows or more, as phi_core's AVX-512 products of
    16-bit weights round a prompt's."""
    rounded = {
        name: (t.to(dtype).float() if name.endswith("weight") and t.dim() == 2 else t)
        for name, t in reference.state_dict().items()
    }
    twin = type(reference)(reference.config).eval()
    twin.load_state_dict(rounded)
    names, rounded_to = rounding

    def round_prompts(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        return (x.to(rounded_to).float(),) if x.numel() // x.shape[-1] >= kernels.ROUNDED_ROWS else args

    for name, module in twin.named_modules():
        if name in names:
            module.register_forward_pre_hook(round_prompts)
    with torch.no_grad():
        return twin(ids).logits


def _tolerance(rounding: tuple[set[str], torch.dtype | None], ids: torch.Tensor) -> float:
    """float32's 1e-4; with rounded inputs a little more: float32 noise between the two implementations can put an
    input on the other side of a rounding boundary (a step of 2**-8 of it in bfloat16; seen with grouped KV heads)."""
    return 3e-4 if rounding[0] and ids.numel() >= kernels.ROUNDED_ROWS else 1e-4


@needs_fbgemm
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("variant", ["phi-1.5-like", "qk-layernorm", "gqa"])
def test_16_bit_weights_compute_like_float32_on_the_rounded_weights(make_checkpoint, variant, dtype):
    reference, folder = make_checkpoint(**CONFIGS[variant])
    ours = phi_core.load_model(folder, dtype=dtype)
    assert ours.compute_dtype == F32
    linears = [m for m in ours.modules() if isinstance(m, PhiLinear)]
    assert linears and all(m.packed is not None and m.weight is None for m in linears)
    rounding = _rounding_inputs(ours)
    for length in (12, 70):  # 24 rows per product (a decode-sized one) and 140 (a prompt's)
        ids = torch.randint(0, 320, (2, length), generator=torch.Generator().manual_seed(3))
        expected = _reference_logits(reference, ids, getattr(torch, dtype), rounding)
        assert (ours(ids).logits - expected).abs().max() <= _tolerance(rounding, ids)


@needs_fbgemm
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_weights_over_float16_range(make_checkpoint, dtype):
    """Refused where the weights would be held as float16; kept where they are true bfloat16."""
    reference, folder = make_checkpoint()
    with torch.no_grad():
        reference.model.layers[0].mlp.fc1.weight[0, 0] = 1e5
    reference.save_pretrained(folder)
    if choose_precision(dtype, "cpu").weight_format in ("rows-f16", "fbgemm-fp16"):
        with pytest.raises(PhiError, match="does not fit in 16 bits here; use --dtype float32"):
            phi_core.load_model(folder, dtype=dtype)
    else:
        model = phi_core.load_model(folder, dtype=dtype)
        assert float(model.model.layers[0].mlp.fc1.unpacked_rows(0, 16)[0, 0]) == 99840.0  # 1e5 in bfloat16


def test_quantize_rows_is_symmetric_per_row_within_half_a_step():
    weight = torch.randn(6, 40) * torch.tensor([1e-3, 0.1, 1.0, 3.0, 10.0, 0.02])[:, None]
    quantized = quantize_rows(weight)
    scales = quantized.q_per_channel_scales().float()
    assert torch.allclose(scales, weight.abs().amax(dim=1) / 127, rtol=1e-6)
    assert quantized.int_repr().abs().max() <= 127
    assert ((quantized.dequantize() - weight).abs() <= scales[:, None] / 2 + 1e-7).all()


@needs_fbgemm
def test_int8_logits_stay_close_on_random_weights(make_checkpoint):
    _, folder = make_checkpoint()
    full = phi_core.load_model(folder, dtype="float32")
    int8 = phi_core.load_model(folder, dtype="int8")
    scale_bytes = 4 if int8.precision.weight_format == "tiles-int8" else 8  # float32 here, float64 in fbgemm's
    assert int8.model.layers[0].mlp.fc1.stored_bytes() == 64 * 128 + scale_bytes * 128  # a byte a weight
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(4))
    expected, got = full(ids).logits, int8(ids).logits
    # Weight and activation rounding: small against the logits' own spread, but not 1e-4.
    assert 1e-4 < (got - expected).abs().max() <= 0.05 * expected.std()


@needs_fbgemm
def test_int8_keeps_the_embedded_models_clear_choices():
    """On a trained model, wherever float32's best token leads clearly, int8 picks it too."""
    tokenizer = phi_core.load_tokenizer("tiny")
    ids = torch.tensor([tokenizer.encode(Path(textwrap.__file__).read_text())[:256]])
    expected = phi_core.load_model("tiny", dtype="float32")(ids).logits[0]
    got = phi_core.load_model("tiny", dtype="int8")(ids).logits[0]
    assert (got - expected).abs().mean() <= 0.01 * expected.std()
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0
    assert clear.sum() >= 64
    assert (got.argmax(-1) == expected.argmax(-1))[clear].all()


def _greedy(model: torch.nn.Module, prompts: list[list[int]], steps: int) -> list[list[int]]:
    params = GenerationParams(max_new_tokens=steps, ignore_eos=True, logprobs=False)
    rows: list[list[int]] = [[] for _ in prompts]
    for event in generate(model, None, prompts, params):
        rows[event.row].append(event.token_id)
    return rows


@needs_fbgemm
def test_embedded_model_bfloat16_greedy_matches_float32():
    """The doc's claim (docs/performance.md): on these prompts bf16 weights give the same greedy tokens."""
    tokenizer = phi_core.load_tokenizer("tiny")
    prompts = [tokenizer.encode(text) for text in ("def fibonacci(n):", "import os\n", "class Stack:\n    def")]
    full = _greedy(phi_core.load_model("tiny", dtype="float32"), prompts, 24)
    assert _greedy(phi_core.load_model("tiny", dtype="bfloat16"), prompts, 24) == full


@needs_fbgemm
def test_cli_reports_the_precision(lm_checkpoint):
    runner = CliRunner()
    # --device cpu: the CPU's weight formats are what this checks, also on a machine with a GPU (the default there)
    args = ["generate", "x", "-m", str(lm_checkpoint), "--max-new-tokens", "3", "--json", "--stats", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--dtype", "int8"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["dtype"] == "int8"
    assert record["kernels"]["weights"] == "int8" and record["kernels"]["storage"] in ("tiles-int8", "fbgemm-int8")
    assert "int8 weights (" in result.stderr
    result = runner.invoke(app, args)  # auto on a float32 checkpoint
    assert json.loads(result.stdout)["dtype"] == "float32"
    assert "auto: float32 weights and compute" in result.stderr
    result = runner.invoke(app, [*args, "--dtype", "float8"])
    assert result.exit_code == 2 and "float8" in result.stderr


@needs_fbgemm
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_matrices_packed_in_blocks_compute_the_same(no_kernels, make_checkpoint, monkeypatch, dtype):
    _, folder = make_checkpoint()
    whole = phi_core.load_model(folder, dtype=dtype)
    monkeypatch.setattr(phi_core.linear, "PACK_BLOCK_ELEMENTS", 64 * 50)  # 50 output rows a block
    blocked = phi_core.load_model(folder, dtype=dtype)
    assert len(whole.lm_head.packed) == 1 and len(blocked.lm_head.packed) == 7  # 320 rows
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(blocked(ids).logits, whole(ids).logits, atol=1e-5)
    one_row = ids[:1, :1]
    assert torch.allclose(blocked(one_row).logits, whole(one_row).logits, atol=1e-5)


@needs_fbgemm
def test_small_matrices_stay_dense_float32_with_the_rounded_values(make_checkpoint, monkeypatch):
    reference, folder = make_checkpoint()
    monkeypatch.setattr(phi_core.linear, "SMALL_MATRIX", 64 * 128)  # fc1 and fc2 (8192 weights) stay dense
    model = phi_core.load_model(folder, dtype="bfloat16")
    fc1 = model.model.layers[0].mlp.fc1
    assert fc1.packed is None and fc1.weight.dtype == F32 and fc1.stored_bytes() == 4 * 64 * 128
    assert torch.equal(fc1.weight, reference.model.layers[0].mlp.fc1.weight.detach().to(BF16).float())
    assert model.lm_head.packed is not None  # 320 x 64 = 20480 weights
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    rounding = _rounding_inputs(model)
    expected = _reference_logits(reference, ids, BF16, rounding)
    assert (model(ids).logits - expected).abs().max() <= _tolerance(rounding, ids)
