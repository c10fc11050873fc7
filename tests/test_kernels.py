"""phi_core's compiled CPU kernels: which one a CPU gets, the cache they are compiled into, the int8 and int4
layouts, and every product against float64 on small odd shapes (skipped where the kernels cannot be compiled)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import phi_core.linear
from phi_core import kernels
from phi_core.kernels import CHOICES, FALLBACK, KINDS, CpuInfo, attention_in_float64
from phi_core.linear import PhiLinear
from phi_core.precision import choose_precision

AVX512 = frozenset(kernels.LEVEL_FEATURES["avx512"])
AVX512_BF16 = frozenset(kernels.LEVEL_FEATURES["avx512bf16"])
AVX2 = frozenset(kernels.LEVEL_FEATURES["avx2"])
HERE = kernels.cpu_info()
# The levels this CPU can run and this machine can compile (each compiled once per cache folder, ~2 s).
RUNNABLE = [level for level in ("avx512bf16", "avx512", "avx2") if set(kernels.LEVEL_FEATURES[level]) <= HERE.flags]
COMPILED = [level for level in RUNNABLE if kernels.library(level) is not None]
needs_kernels = pytest.mark.skipif(not COMPILED, reason=f"no compiled kernels here: {kernels.kernel_status()}")


@pytest.fixture
def fresh_library(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """An empty cache folder and no remembered library; the real ones are restored afterwards."""
    monkeypatch.setenv("PHI_CACHE_DIR", str(tmp_path))
    kernels.library.cache_clear()
    yield tmp_path / "kernels"
    kernels.library.cache_clear()


def fake_cpu(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str]) -> None:
    monkeypatch.setattr(kernels, "cpu_info", lambda: CpuInfo("Faked CPU", flags))


# Capability and choice ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "level"),
    [
        (AVX512_BF16, "avx512bf16"),  # Zen 4 and 5, Sapphire Rapids
        (AVX512_BF16 | {"amx_tile", "amx_int8"}, "avx512bf16"),
        (AVX512, "avx512"),  # Ice Lake
        (AVX512_BF16 - {"avx512_vnni"}, "avx2"),  # AVX-512 without VNNI runs the AVX2 kernels
        (AVX512 - {"avx512_vnni"}, "avx2"),  # Skylake-X
        (AVX2, "avx2"),
        (AVX2 - {"f16c"}, "none"),
        (frozenset(), "none"),
    ],
)
def test_level_from_flags(flags, level):
    assert CpuInfo("x", flags).level == level


def test_level_can_be_capped(monkeypatch):
    monkeypatch.setenv("PHI_CPU_LEVEL", "avx512")
    assert CpuInfo("x", AVX512_BF16).level == "avx512"
    monkeypatch.setenv("PHI_CPU_LEVEL", "avx2")
    assert CpuInfo("x", AVX512).level == "avx2"
    monkeypatch.setenv("PHI_CPU_LEVEL", "none")
    assert CpuInfo("x", AVX512).level == "none"
    monkeypatch.setenv("PHI_CPU_LEVEL", "avx512")  # a cap never raises the level
    assert CpuInfo("x", AVX2).level == "avx2"


def test_cpu_info_names_the_features():
    text = CpuInfo("AMD EPYC", AVX512_BF16 | {"amx_tile"}).describe()
    assert text.startswith("AMD EPYC (avx512bf16: ") and "avx512_vnni" in text and "amx_tile" in text
    assert HERE.describe().startswith(HERE.model)


@pytest.mark.parametrize("level", ["avx512bf16", "avx512", "avx2"])
def test_faked_capability_picks_that_levels_kernels(monkeypatch, level):
    if level not in COMPILED:
        pytest.skip(f"the {level} kernels cannot run here")
    fake_cpu(monkeypatch, frozenset(kernels.LEVEL_FEATURES[level]))
    for weights in ("float32", "bfloat16", "float16", "int8", "int4"):
        assert kernels.choose(weights) == CHOICES[level][weights]
    precision = choose_precision("bfloat16", "cpu")
    assert precision.weight_format == "rows-bf16" and precision.describe().endswith(f"; phi {level} bf16")
    # Only AVX-512 BF16's product rounds bfloat16 weights' activations (to bfloat16), AVX-512's round float16
    # weights' (to float16), and only for prompts; --stats says so.
    assert ("activations rounded to bfloat16" in precision.describe()) == (level == "avx512bf16")
    float16 = choose_precision("float16", "cpu").describe()
    assert ("activations rounded to float16" in float16) == level.startswith("avx512")
    for kind in ("bf16", "f16"):
        assert kernels.rounded_activations(kind, level, kernels.ROUNDED_ROWS - 1) is None
    layer = PhiLinear(2048, 1024)
    layer.pack("tiles-int4")
    assert layer.kernels is kernels.library(level) and layer.kernels.level == level


def test_faked_cpu_without_avx2_gets_torchs_products(monkeypatch):
    fake_cpu(monkeypatch, frozenset({"sse4_2"}))
    for weights in ("float32", "bfloat16", "float16", "int8", "int4"):
        assert kernels.choose(weights) == FALLBACK[weights]
    assert kernels.kernel_status().startswith("no AVX2")
    layer = PhiLinear(2048, 1024)
    layer.pack("dense")
    assert layer.kernels is None


def test_no_compiler_falls_back_to_torch(monkeypatch, fresh_library):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    level = HERE.level if HERE.level != "none" else "avx2"
    assert kernels.library(level) is None
    assert "no C++ compiler" in kernels.kernel_status(level)
    fake_cpu(monkeypatch, AVX2)
    assert kernels.choose("int8") == FALLBACK["int8"]
    # int4 still works, through torch: the weights widened to float32 a block at a time.
    generator = torch.Generator().manual_seed(0)
    layer = PhiLinear(300, 40)
    torch.nn.init.normal_(layer.weight, generator=generator)
    layer.pack("tiles-int4")
    assert layer.kernels is None
    x = torch.randn(3, 300, generator=generator)
    exact = layer.unpacked_rows(0, 40).double()
    expected = x.double() @ exact.T + layer.bias.double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-4)


def test_a_failing_compiler_falls_back(monkeypatch, fresh_library, tmp_path):
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    assert kernels.library("avx2") is None
    assert "compiling the avx2 kernels failed (error: no such thing)" in kernels.kernel_status("avx2")


# The cache ------------------------------------------------------------------------------------------------------
def _copy_into(level: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> tuple:
    """The real cache's library of ``level`` copied into a new cache folder, which is then the one in use (no
    compiling); the library's and the manifest's paths there."""
    sources = kernels._paths(level)
    monkeypatch.setenv("PHI_CACHE_DIR", str(tmp_path))
    library, manifest = kernels._paths(level)
    library.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sources[0], library)
    shutil.copyfile(sources[1], manifest)
    return library, manifest


@needs_kernels
def test_cached_library_is_reused(monkeypatch, tmp_path):
    level = COMPILED[0]
    real_library = kernels._paths(level)[0]
    library, _ = _copy_into(level, monkeypatch, tmp_path)
    assert library != real_library
    loaded = kernels._cached(level)
    assert loaded is not None and loaded.path == library


@needs_kernels
@pytest.mark.parametrize(
    "damage", ["manifest garbage", "manifest list", "stale source", "other level", "truncated library", "garbage"]
)
def test_bad_cache_files_are_ignored(monkeypatch, tmp_path, damage):
    level = COMPILED[0]
    library, manifest = _copy_into(level, monkeypatch, tmp_path)
    record = json.loads(manifest.read_text())
    if damage == "manifest garbage":
        manifest.write_bytes(b"\x00\xff{not json")
    elif damage == "manifest list":
        manifest.write_text("[1, 2]")
    elif damage == "stale source":
        manifest.write_text(json.dumps({**record, "source_sha256": "0" * 64}))
    elif damage == "other level":
        manifest.write_text(json.dumps({**record, "level": "avx2" if level == "avx512" else "avx512"}))
    elif damage == "truncated library":
        library.write_bytes(library.read_bytes()[:1000])
    else:  # garbage whose hash the manifest records: loading it fails
        library.write_bytes(b"\x7fELF garbage")
        manifest.write_text(
            json.dumps({**record, "library_sha256": kernels.hashlib.sha256(b"\x7fELF garbage").hexdigest()})
        )
    assert kernels._cached(level) is None


@needs_kernels
def test_a_bad_cache_is_rebuilt(fresh_library):
    level = COMPILED[0]
    library, manifest = kernels._paths(level)
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not a library")
    manifest.write_text("{}")
    stale = library.with_name(f"cpu_kernels-{level}-0123456789abcdef.so")
    stale.write_bytes(b"an older build")
    loaded = kernels.library(level)
    assert loaded is not None and loaded.path == library
    assert "compiled into" in kernels.kernel_status(level)
    assert json.loads(manifest.read_text())["level"] == level
    assert not stale.exists()


# Layouts ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", kernels.INT4_GROUPS)
@pytest.mark.parametrize(("out_features", "in_features"), [(16, 64), (37, 70), (5, 300), (64, 128)])
def test_int4_pack_round_trip(group, out_features, in_features):
    generator = torch.Generator().manual_seed(1)
    # Values a float16 scale times -8..7 holds exactly come back exactly.
    groups = -(-in_features // group)
    scales = (torch.rand(out_features, groups, 1, generator=generator) + 0.5).half().float() / 64
    values = torch.randint(-8, 8, (out_features, groups, group), generator=generator).float()
    values[:, :, 0] = -8  # the group's extreme, as quantizing puts it
    exact = (values * scales).view(out_features, -1)[:, :in_features]
    tiles, packed_scales = kernels.pack_int4(exact, group)
    assert tiles.dtype == torch.uint8 and tiles.numel() == -(-out_features // 16) * 16 * groups * group // 2
    assert torch.equal(kernels.unpack_int4(tiles, packed_scales, out_features, in_features, group), exact)
    # Any weights: within one step of their group (half a step, but the value opposite the extreme may clamp).
    weight = torch.randn(out_features, in_features, generator=generator)
    tiles, packed_scales = kernels.pack_int4(weight, group)
    back = kernels.unpack_int4(tiles, packed_scales, out_features, in_features)
    padded = torch.nn.functional.pad(weight, (0, groups * group - in_features)).view(out_features, groups, group)
    step = (padded.abs().amax(dim=-1, keepdim=True) / 8).expand(-1, -1, group).reshape(out_features, -1)
    error = back - weight
    assert (error.abs() <= step[:, :in_features] * 1.01).all()
    assert error.abs().mean() <= 0.3 * step.mean()


def test_int8_pack_round_trip():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(37, 70, generator=generator) * torch.logspace(-3, 1, 37)[:, None]
    tiles, scales = kernels.pack_int8(weight)
    back = kernels.unpack_int8(tiles, scales, 37, 70)
    assert torch.allclose(scales[:37], weight.abs().amax(dim=1) / 127)
    assert ((back - weight).abs() <= scales[:37, None] / 2 + 1e-7).all()
    assert torch.equal(kernels.unpack_int8(*kernels.pack_int8(back), 37, 70), back)


@pytest.mark.parametrize("weight_format", ["tiles-int8", "tiles-int4", "rows-bf16"])
def test_packing_in_row_blocks_gives_the_same_layout(monkeypatch, weight_format):
    monkeypatch.setattr(phi_core.linear, "SMALL_MATRIX", 0)
    torch.manual_seed(3)
    whole, blocked = PhiLinear(96, 200), PhiLinear(96, 200)
    blocked.load_state_dict(whole.state_dict())
    whole.pack(weight_format)
    monkeypatch.setattr(phi_core.linear, "PACK_BLOCK_ELEMENTS", 96 * 48)  # 48 output rows a block
    blocked.pack(weight_format)
    assert all(torch.equal(a, b) for a, b in zip(whole.packed, blocked.packed, strict=True))
    assert torch.equal(whole.unpacked_rows(16, 200), blocked.unpacked_rows(16, 200))


# Numerics against float64 ----------------------------------------------------------------------------------------
def quantized_activations(x: torch.Tensor, in_features_padded: int) -> torch.Tensor:
    """The activations as the integer products see them: int8 per block of 32, as float64 (the C++'s rounding)."""
    padded = torch.nn.functional.pad(x, (0, in_features_padded - x.shape[-1])).view(x.shape[0], -1, 32)
    largest = padded.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    values = torch.round(padded * inverse)  # float32 product, rounded half to even, as cvtps2dq
    return (values.double() * (largest / 127.0).double()).view(x.shape[0], -1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 3, 8, 11, kernels.ROUNDED_ROWS + 3])
# (21, 2100): more inputs than one block of the many-row products (1024 and 2048), and a tail after them.
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 7), (16, 32), (37, 70), (50, 256), (21, 2100)])
def test_kernels_against_float64(kind, rows, out_features, in_features):
    if not COMPILED:
        pytest.skip(kernels.kernel_status())
    generator = torch.Generator().manual_seed(out_features * in_features + rows)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    packed, exact, group = kernels.pack(kind, weight)
    for level in COMPILED:
        if kind in ("q8", "q4"):
            padded = -(-in_features // group) * group
            seen = quantized_activations(x, padded)[:, :in_features]
        else:
            seen = x.to(kernels.rounded_activations(kind, level, rows) or x.dtype).double()
        expected = seen @ exact.double().T + bias.double()
        got = kernels.library(level).linear(kind, x, packed, bias, out_features, group).double()
        scale = expected.abs().max() + 1
        assert (got - expected).abs().max() <= 2e-5 * scale, (level, kind)


# (batch, heads, kv_heads, new, total, head_dim): one decode step; a check of proposed tokens; grouped kv heads;
# prompt pieces after a cache and from scratch, over several blocks of queries and with a ragged last one; head
# sizes that are not a multiple of either vector width.
ATTENTION_SHAPES = [
    (1, 4, 4, 1, 1, 16),
    (2, 4, 4, 1, 37, 64),
    (1, 4, 4, 9, 30, 32),
    (3, 8, 2, 5, 9, 8),
    (2, 8, 2, 40, 45, 20),
    (1, 6, 6, 70, 70, 64),
    (2, 3, 3, 130, 200, 80),
    (1, 2, 2, 17, 17, 12),
]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_against_float64(shape, padded):
    if not COMPILED:
        pytest.skip(kernels.kernel_status())
    batch, heads, kv_heads, new, total, dim = shape
    generator = torch.Generator().manual_seed(total * dim + new)
    q = torch.randn(batch, heads, new, dim, generator=generator) * 3  # peaked softmax rows too
    # keys and values as a KV cache holds them: a longer buffer of which the first `total` positions are read
    k = torch.randn(batch, kv_heads, total + 5, dim, generator=generator)[:, :, :total]
    v = torch.randn(batch, kv_heads, total + 5, dim, generator=generator)[:, :, :total]
    key_valid = torch.rand(batch, total, generator=generator) > 0.4 if padded else None
    expected = attention_in_float64(q, k, v, key_valid)
    for level in COMPILED:
        got = kernels.library(level).attention(q, k, v, key_valid)
        assert got is not None and got.shape == expected.shape
        assert (got.double() - expected).abs().max() <= 2e-5, level


def test_attention_reads_strided_queries_and_gives_each_query_the_same_result_alone():
    """Queries as the fused projection leaves them (heads interleaved along the row), and a one-query step equals
    that query's row in a several-query call bitwise: speculative checks then see what plain decoding sees."""
    if not COMPILED:
        pytest.skip(kernels.kernel_status())
    generator = torch.Generator().manual_seed(3)
    projected = torch.randn(1, 9, 3, 4, 32, generator=generator)  # (batch, new, q/k/v, heads, head_dim)
    q, k, v = (projected[:, :, part].transpose(1, 2) for part in range(3))
    for level in COMPILED:
        library = kernels.library(level)
        many = library.attention(q, k, v, None)
        assert (many.double() - attention_in_float64(q, k, v, None)).abs().max() <= 2e-5, level
        last = library.attention(q[:, :, -1:], k, v, None)
        assert torch.equal(last[:, 0], many[:, -1]), level


def test_attention_declines_what_it_does_not_compute():
    if not COMPILED:
        pytest.skip(kernels.kernel_status())
    library = kernels.library(COMPILED[0])
    q = torch.randn(1, 2, 3, 16)
    k = v = torch.randn(1, 2, 5, 16)
    assert library.attention(q.double(), k.double(), v.double(), None) is None
    assert library.attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, None) is None
    assert library.attention(q, k, v, torch.ones(2, 5, dtype=torch.bool)) is None


def test_gelu_against_float64():
    """Phi's gelu_new, including tails where float32's 1 + tanh(u) would cancel to zero, and non-finite inputs."""
    if not COMPILED:
        pytest.skip(kernels.kernel_status())
    generator = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(100_003, generator=generator) * 4, torch.tensor([0.0, -0.0, 12.0, -12.0, 1e30, -1e30])])
    u = math.sqrt(2 / math.pi) * (x.double() + 0.044715 * x.double() ** 3)
    t = torch.exp(-2 * u.abs())  # (1 + tanh u) / 2 without cancellation: 1 / (1 + t), or t / (1 + t) for u < 0
    expected = x.double() * torch.where(u < 0, t, torch.ones_like(t)) / (1 + t)
    for level in COMPILED:
        got = kernels.library(level).gelu_tanh_(x.clone()).double()
        assert ((got - expected).abs() <= 1e-6 * (1 + expected.abs())).all(), level
    nan = kernels.library(COMPILED[0]).gelu_tanh_(torch.tensor([math.nan, math.inf, -math.inf]))
    assert nan[0].isnan() and nan[1] == math.inf and nan[2].isnan()  # as torch's: -inf * 0


@pytest.mark.parametrize("rows", [1, 11, kernels.ROUNDED_ROWS + 3])
def test_float16_products_leave_activations_beyond_float16_unrounded(rows):
    """A call with an activation float16 cannot hold multiplies the float32 activations as they are (no infinity)."""
    if not COMPILED:
        pytest.skip(kernels.kernel_status())
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(24, 300, generator=generator)
    x = torch.randn(rows, 300, generator=generator)
    x[-1, 7] = 1e5
    packed, exact, _ = kernels.pack("f16", weight)
    expected = x.double() @ exact.double().T
    for level in COMPILED:
        got = kernels.library(level).linear("f16", x, packed, None, 24).double()
        assert got.isfinite().all() and (got - expected).abs().max() <= 2e-5 * expected.abs().max(), level


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_activations_give_nan_as_a_float_product_would(kind):
    if not COMPILED:
        pytest.skip(kernels.kernel_status())
    weight = torch.randn(20, 64, generator=torch.Generator().manual_seed(5))
    packed, _, group = kernels.pack(kind, weight)
    x = torch.ones(3, 64)
    x[0, 5], x[2, 40] = float("nan"), float("inf")
    for level in COMPILED:
        got = kernels.library(level).linear(kind, x, packed, None, 20, group)
        assert got[0].isnan().all() and got[1].isfinite().all() and not got[2].isfinite().any()


@needs_kernels
@pytest.mark.parametrize("weight_format", ["dense", "rows-bf16", "rows-f16", "tiles-int8", "tiles-int4"])
def test_packed_layers_multiply_like_their_weights(monkeypatch, weight_format):
    """Through PhiLinear: any leading shape, one row (decoding) and many (prefill), with and without bias."""
    monkeypatch.setattr(phi_core.linear, "SMALL_MATRIX", 0)
    torch.manual_seed(4)
    for bias in (True, False):
        layer = PhiLinear(96, 40, bias=bias)
        layer.pack(weight_format)
        exact = layer.unpacked_rows(0, 40).double()
        for shape in ((96,), (1, 1, 96), (2, 5, 96), (40, 96), (2, 70, 96)):  # 140 rows: a prompt's products
            x = torch.randn(shape)
            flat = x.reshape(-1, 96)
            if weight_format.startswith("tiles") and flat.shape[0] <= layer.few_rows:
                flat_seen = quantized_activations(flat, -(-96 // layer.group) * layer.group)[:, :96]
            elif weight_format in ("rows-bf16", "rows-f16"):
                kind = weight_format.removeprefix("rows-")
                rounded = kernels.rounded_activations(kind, layer.kernels.level, flat.shape[0])
                flat_seen = flat.to(rounded or flat.dtype).double()
            else:
                flat_seen = flat.double()
            expected = flat_seen @ exact.T + (layer.bias.double() if bias else 0)
            got = layer(x)
            assert got.shape == (*shape[:-1], 40)
            assert (got.reshape(-1, 40).double() - expected).abs().max() <= 1e-4 * (expected.abs().max() + 1)


@needs_kernels
def test_dense_weights_off_the_cpu_never_reach_the_compiled_products(monkeypatch):
    """The compiled products read CPU memory: a GPU model's layers (meta here, as no GPU is at hand) take torch's,
    and so does a CPU-packed layer handed an activation that is not on the CPU (a model moved after loading)."""
    monkeypatch.setattr(phi_core.linear, "SMALL_MATRIX", 0)
    elsewhere = PhiLinear(96, 40, device="meta")
    elsewhere.pack("dense")
    assert elsewhere.kernels is None
    layer = PhiLinear(96, 40)
    layer.pack("dense")
    assert layer.kernels is not None
    with pytest.raises(RuntimeError, match="device"):  # torch's own mismatch error, not a crash in C++
        layer(torch.randn(2, 96, device="meta"))


@pytest.mark.skipif(not hasattr(kernels.mmap, "MADV_HUGEPAGE"), reason="no transparent huge pages here")
def test_weights_ask_for_huge_pages_over_their_whole_2mb_stretches(monkeypatch):
    calls = []
    real_mmap = kernels.mmap.mmap

    class Recording(real_mmap):
        def madvise(self, advice, start, length):  # the same mapping, recording the advice
            calls.append((advice, start, length))
            return super().madvise(advice, start, length)

    monkeypatch.setattr(kernels.mmap, "mmap", Recording)
    big = kernels.empty_on_huge_pages((3, 1 << 20), torch.bfloat16)  # 6 MB
    assert big.shape == (3, 1 << 20) and big.dtype == torch.bfloat16
    ((advice, _start, length),) = calls
    assert advice == kernels.mmap.MADV_HUGEPAGE and length == 6 << 20
    assert big.data_ptr() % kernels.HUGE_PAGE == 0  # the tensor starts on a 2 MB boundary
    calls.clear()
    small = kernels.empty_on_huge_pages((1 << 20,), torch.uint8)  # 1 MB: plain memory, nothing asked
    assert calls == [] and small.shape == (1 << 20,)
    source = torch.randn(700, 3000)
    copied = kernels.copy_to_huge_pages(source, torch.bfloat16)
    assert copied.dtype == torch.bfloat16 and torch.equal(copied, source.to(torch.bfloat16))


def test_huge_page_advice_works_on_this_machine():
    """The memory outlives every name for its mapping, and is ordinary memory to torch."""
    tensor = kernels.empty_on_huge_pages((5 << 20,), torch.uint8)
    tensor.fill_(7)
    assert int(tensor.sum()) == 7 * (5 << 20)


def test_inference_models_take_attention_and_gelu_from_the_kernels(make_checkpoint):
    """Prepared for inference on a CPU: the compiled attention (sdpa backend) and GELU; eager keeps torch's
    attention, and a model loaded for training keeps torch's everything (the kernels have no gradients)."""
    if not COMPILED:
        pytest.skip(kernels.kernel_status())
    import phi_core

    _, folder = make_checkpoint()
    model = phi_core.load_model(folder)
    layer = model.model.layers[0]
    assert layer.self_attn.kernels is not None and layer.mlp.kernels is not None
    model.set_attention_backend("eager")
    assert layer.self_attn.kernels is None and layer.mlp.kernels is not None
    trainable = phi_core.load_model(folder, prepare=False).model.layers[0]
    assert trainable.self_attn.kernels is None and trainable.mlp.kernels is None


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "rotary_dim"), [(4, 4, 16, 8), (8, 2, 20, 8), (2, 2, 32, 32)])
def test_rotation_into_the_cache_matches_the_python_rotation(heads, kv_heads, dim, rotary_dim):
    """Queries returned and keys/values written at the cache's next positions as apply_rotary and KVCache.update
    would give them, with per-row positions, partial rotary and grouped heads, into a cache that is a row slice of a
    larger one (as the engine's first_rows hands out)."""
    if not COMPILED:
        pytest.skip(kernels.kernel_status())
    from phi_core.config import PhiConfig
    from phi_core.rotary import apply_rotary, rotary_angles

    config = PhiConfig.from_hf_dict(
        {
            "hidden_size": heads * dim,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "partial_rotary_factor": rotary_dim / dim,
            "vocab_size": 10,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
        }
    )
    generator = torch.Generator().manual_seed(heads + dim)
    batch, new, start = 3, 5, 7
    projected = torch.randn(batch, new, (heads + 2 * kv_heads) * dim, generator=generator)
    positions = torch.arange(new)[None, :] + torch.tensor([[2], [9], [0]])
    rotation = rotary_angles(config, positions, 40)
    qk = apply_rotary(projected[..., : (heads + kv_heads) * dim].view(batch, new, heads + kv_heads, dim), rotation)
    values = projected[..., (heads + kv_heads) * dim :].view(batch, new, kv_heads, dim)
    for level in COMPILED:
        stored_keys = torch.randn(batch + 1, kv_heads, 20, dim, generator=generator)
        stored_values = torch.randn(batch + 1, kv_heads, 20, dim, generator=generator)
        keys_before, values_before = stored_keys.clone(), stored_values.clone()
        q = kernels.library(level).rotate_into_cache(
            projected,
            rotation.cos,
            rotation.sin,
            rotation.rotary_dim,
            heads,
            stored_keys[:batch],
            stored_values[:batch],
            start,
        )
        assert q is not None
        torch.testing.assert_close(q, qk[:, :, :heads].transpose(1, 2), atol=1e-6, rtol=1e-6)
        window = slice(start, start + new)
        torch.testing.assert_close(
            stored_keys[:batch, :, window], qk[:, :, heads:].transpose(1, 2), atol=1e-6, rtol=1e-6
        )
        assert torch.equal(stored_values[:batch, :, window], values.transpose(1, 2))
        outside = torch.ones(20, dtype=torch.bool)
        outside[window] = False
        assert torch.equal(stored_keys[:, :, outside], keys_before[:, :, outside])
        assert torch.equal(stored_keys[batch], keys_before[batch]) and torch.equal(
            stored_values[batch], values_before[batch]
        )
        assert (
            kernels.library(level).rotate_into_cache(
                projected, rotation.cos, rotation.sin, rotation.rotary_dim, heads, stored_keys, stored_values, 16
            )
            is None
        )  # would run past the cache's end
