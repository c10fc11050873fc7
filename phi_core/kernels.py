"""phi_core's own CPU products, compiled on this machine at first use, and which product serves each weight format.

What the CPU can do is read once (:func:`cpu_info`) and reduced to a **level**: ``avx512bf16`` (the next level
with AVX-512 BF16 as well: Intel since Cooper Lake and Sapphire Rapids, AMD since Zen 4), ``avx512`` (AVX-512
F/BW/VL/DQ with VNNI: Intel since Ice Lake), ``avx2`` (AVX2, FMA and F16C: Intel since Haswell, AMD since Zen 1)
or ``none``. ``csrc/cpu_kernels.cpp`` is compiled for the level with the system's C++ compiler (``c++``,
or ``$CXX``) into the user's cache folder (``$PHI_CACHE_DIR``, else ``$XDG_CACHE_HOME/phi-toolkit``, else
``~/.cache/phi-toolkit``), about two seconds once; a manifest beside the library records the source's hash, the
level and the flags, and a library whose manifest is missing, unreadable or stale, or which fails a numerical
self-test when loaded, is rebuilt. Without a compiler, or when compiling fails, every product falls back to
torch's own (MKL for float32, fbgemm's packed float16 and int8), and :func:`kernel_status` says why.

Which product serves which weight format at which level is a table (:data:`CHOICES`) measured on the machine it
names; ``PHI_CPU_LEVEL`` (``avx2`` or ``none``) caps the level, to compare or to work around a problem.

Layouts (``pack_int8``, ``pack_int4``; row-major ``(out, in)`` for float32, bfloat16 and float16):

- int8: one symmetric scale per output row (``max |w| / 127``), values stored as ``w + 128`` in tiles of 16
  output rows; inside a tile, for every 4 inputs, 16 rows x 4 bytes (64 bytes: one AVX-512 register, which one
  VNNI instruction multiplies with 4 activations broadcast to all rows). Inputs are padded to a multiple of 32.
- int4: per output row and group of ``group`` inputs one float16 scale ``d`` (the group's value of largest
  magnitude is ``-8 d``, as llama.cpp's q4_0), values ``q = round(w / d) + 8`` in 0..15; tiles of 16 rows, for
  every 8 inputs 64 bytes, byte ``4 r + j`` holding input ``j`` of row ``r`` in its low nibble and input ``4 + j``
  in its high nibble. Scales are stored ``[tile][group][16 rows]``. Inputs are padded to a multiple of the group.

The integer products quantize each call's activations to int8 in blocks of 32 (a scale per block) and multiply
with integer dot products (AVX-512 VNNI, or AVX2's ``maddubs``), as llama.cpp does for q8_0 and q4_0.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import math
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

Level = Literal["avx512bf16", "avx512", "avx2", "none"]
LEVELS: tuple[Level, ...] = ("avx512bf16", "avx512", "avx2", "none")
_AVX512 = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
LEVEL_FEATURES: dict[Level, tuple[str, ...]] = {
    "avx512bf16": (*_AVX512, "avx512_bf16"),
    "avx512": _AVX512,
    "avx2": ("avx2", "fma", "f16c"),
    "none": (),
}
# The features worth naming in --stats (AMX is detected and reported; no kernel uses it).
NOTABLE_FEATURES = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
_AVX512_FLAGS = ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni")
COMPILE_FLAGS: dict[Level, tuple[str, ...]] = {
    "avx512bf16": (*_AVX512_FLAGS, "-mavx512bf16"),
    "avx512": _AVX512_FLAGS,
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
}
_LEVEL_IDS = {"avx512bf16": 3, "avx512": 2, "avx2": 1}
SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
QBLOCK = 32  # activation quantization block of the integer products
TILE = 16  # output rows per tile of the integer layouts
INT4_GROUPS = (32, 64, 128)
KINDS = ("f32", "bf16", "f16", "q8", "q4")  # the compiled products, one per weight layout


# CPU -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and feature flags (as /proc/cpuinfo spells them), and what they allow."""

    model: str
    flags: frozenset[str]

    @property
    def level(self) -> Level:
        """The best kernel level every needed feature of which is present, capped by ``PHI_CPU_LEVEL``."""
        cap = os.environ.get("PHI_CPU_LEVEL", "").strip().lower()
        allowed = LEVELS[LEVELS.index(cap) :] if cap in LEVELS else LEVELS  # type: ignore[arg-type]
        return next(level for level in allowed if all(f in self.flags for f in LEVEL_FEATURES[level]))

    def describe(self) -> str:
        """``AMD EPYC (avx512: avx2 fma f16c avx512f avx512_vnni avx512_bf16)``."""
        features = " ".join(f for f in NOTABLE_FEATURES if f in self.flags) or "no AVX2"
        return f"{self.model} ({self.level}: {features})"


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU, from /proc/cpuinfo where there is one, else from what torch detected."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not flags:
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    if not flags and platform.machine().lower() in ("x86_64", "amd64"):
        # No /proc/cpuinfo (macOS, Windows): torch's own dispatch level says at least this much.
        capability = torch.backends.cpu.get_cpu_capability()
        flags = set(LEVEL_FEATURES["avx2"]) if capability in ("AVX2", "AVX512") else set()
    return CpuInfo(model, frozenset(flags))


# Which product serves each weight format ------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """How one kind of weights is stored and multiplied at one level: ``few`` serves products of up to
    ``few_rows`` activation rows (decoding, batched decoding), ``many`` the longer ones (prefill)."""

    storage: str
    few: str
    many: str
    few_rows: int

    def describe(self) -> str:
        if self.few == self.many:
            return f"{self.storage}: {self.few}"
        return f"{self.storage}: {self.few} up to {self.few_rows} rows, {self.many} beyond"


# The compiled product that multiplies each of phi_core's own storage formats (phi_core.linear's names).
KIND_OF_STORAGE = {"dense": "f32", "rows-bf16": "bf16", "rows-f16": "f16", "tiles-int8": "q8", "tiles-int4": "q4"}
_OWN_STORAGE = {
    "float32": "dense",
    "bfloat16": "rows-bf16",
    "float16": "rows-f16",
    "int8": "tiles-int8",
    "int4": "tiles-int4",
}


def _own_products(level: Level) -> dict[str, Choice]:
    """A level whose own products serve every weight size at every row count."""
    choices = {}
    for weights, storage in _OWN_STORAGE.items():
        name = f"phi {level} {KIND_OF_STORAGE[storage]}"
        choices[weights] = Choice(storage, name, name, 1 << 30)
    return choices


# Measured on an AMD EPYC Zen 5 (family 26, 2 cores, AVX-512 with VNNI and BF16), torch 2.13: see
# docs/performance.md and benchmarks/linear_layout.py, which repeats the measurements.
CHOICES: dict[Level, dict[str, Choice]] = {
    # bfloat16: prompts' activations rounded to bfloat16 for AVX-512 BF16 dot products (prefill of 512 tokens
    # 1.5x the float32-FMA product's speed here); see rounded_activations.
    "avx512bf16": _own_products("avx512bf16"),
    "avx512": _own_products("avx512"),
    # float32 beyond 16 rows: MKL's product measured faster than phi's AVX2 one
    "avx2": {**_own_products("avx2"), "float32": Choice("dense", "phi avx2 f32", "torch mkl", 16)},
}
# Without compiled kernels: torch's own products (fbgemm's where this torch has it).
FALLBACK: dict[str, Choice] = {
    "float32": Choice("dense", "torch", "torch", 1 << 30),
    "bfloat16": Choice("fbgemm-fp16", "fbgemm fp16", "fbgemm fp16", 1 << 30),
    "float16": Choice("fbgemm-fp16", "fbgemm fp16", "fbgemm fp16", 1 << 30),
    "int8": Choice("fbgemm-int8", "fbgemm int8", "fbgemm int8", 1 << 30),
    "int4": Choice("tiles-int4", "torch dequantize (slow)", "torch dequantize (slow)", 1 << 30),
}


# Products of this many activation rows or more (prompts) round 16-bit weights' activations; fewer (decoding,
# checking proposed tokens, batches of rows) keep float32: rounding would turn the float32 noise between a one-row
# step and a several-row check into a rounding step's difference, where a greedy near-tie could go another way
# with speculative decoding than without.
ROUNDED_ROWS = 128


def rounded_activations(kind: str, level: Level, rows: int = ROUNDED_ROWS) -> torch.dtype | None:
    """The dtype the float product ``kind`` of ``level`` rounds ``rows`` activation rows to (None: unrounded).

    From :data:`ROUNDED_ROWS` rows: bfloat16 weights on AVX-512 BF16 round to bfloat16, for its dot products
    (1.4-1.8x the float32-FMA product on a Zen 5); float16 weights with AVX-512 round to float16, as llama.cpp's
    f16 products do (both operands then float16 in memory: 1.0-1.17x), except in a call with an activation beyond
    float16's range, which multiplies them unrounded."""
    if rows < ROUNDED_ROWS:
        return None
    if kind == "bf16" and level == "avx512bf16":
        return torch.bfloat16
    if kind == "f16" and level in ("avx512bf16", "avx512"):
        return torch.float16
    return None


def choose(weights: str, level: Level | None = None) -> Choice:
    """The storage and products for ``weights`` (``float32``, ``bfloat16``, ``float16``, ``int8``, ``int4``) at
    ``level`` (this machine's by default), falling back to torch's products when the kernels cannot be had."""
    level = cpu_info().level if level is None else level
    if level in CHOICES and library(level) is not None:
        return CHOICES[level][weights]
    return FALLBACK[weights]


# The compiled library ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    base = os.environ.get("PHI_CACHE_DIR")
    if base:
        return Path(base) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "phi-toolkit" / "kernels"


class Kernels:
    """The compiled library of one level, its functions typed for ctypes (which releases the GIL in each call)."""

    def __init__(self, path: Path, level: Level) -> None:
        self.path, self.level = path, level
        lib = ctypes.CDLL(str(path))
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self.products = {}
        for kind in KINDS:
            function = getattr(lib, f"phi_linear_{kind}")
            function.argtypes = [pointer, size, size, pointer, pointer, size, size, pointer, pointer, ctypes.c_int]
            function.restype = None
            self.products[kind] = function
        lib.phi_kernels_level.restype = ctypes.c_int
        lib.phi_attention.argtypes = [pointer] * 5 + [size] * 6 + [ctypes.c_float, pointer, ctypes.c_int]
        lib.phi_attention.restype = None
        lib.phi_rotate_into_cache.argtypes = [pointer] + [size] * 6 + [pointer] * 6 + [size, ctypes.c_int]
        lib.phi_rotate_into_cache.restype = None
        lib.phi_gelu_tanh.argtypes = [pointer, size, ctypes.c_int]
        lib.phi_gelu_tanh.restype = None
        self.lib = lib

    def linear(
        self,
        kind: str,
        x: torch.Tensor,
        weight: tuple[torch.Tensor, ...],
        bias: torch.Tensor | None,
        out_features: int,
        group: int = 0,
    ) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x`` of any leading shape; ``weight`` as :func:`pack` made it for ``kind``."""
        in_features = x.shape[-1]
        flat = x.reshape(-1, in_features)
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.float().contiguous()
        out = torch.empty(flat.shape[0], out_features)
        scales = weight[1].data_ptr() if len(weight) > 1 else None
        self.products[kind](
            flat.data_ptr(),
            flat.shape[0],
            in_features,
            weight[0].data_ptr(),
            scales,
            group,
            out_features,
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out.view(*x.shape[:-1], out_features)

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Causal attention of float32 queries (batch, heads, new, head_dim) over keys and values (batch, kv_heads,
        total, head_dim), the queries being the last ``new`` positions; ``key_valid`` (batch, total) marks real keys
        (a padding key is seen only by its own position). Returns (batch, new, heads * head_dim), or None where the
        kernel does not apply (another dtype or device, strided head dimensions)."""
        batch, heads, new, dim = q.shape
        kv_heads, total = k.shape[1], k.shape[2]
        if heads % kv_heads or new > total or v.shape != k.shape:
            return None
        if any(t.dtype != torch.float32 or t.stride(-1) != 1 or not t.is_cpu for t in (q, k, v)):
            return None
        if key_valid is not None:
            if key_valid.shape != (batch, total):
                return None
            key_valid = key_valid.to(torch.bool).contiguous()
        out = torch.empty(batch, new, heads * dim)
        strides = (ctypes.c_int64 * 9)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        self.lib.phi_attention(
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            ctypes.addressof(strides),
            None if key_valid is None else key_valid.data_ptr(),
            batch,
            heads,
            kv_heads,
            new,
            total,
            dim,
            1.0 / math.sqrt(dim),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out

    def rotate_into_cache(
        self,
        projected: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rotary_dim: int,
        heads: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        start: int,
    ) -> torch.Tensor | None:
        """Rotated queries (batch, heads, new, head_dim) from a fused q/k/v projection (batch, new, (heads + 2 *
        kv_heads) * head_dim); its rotated keys and its values are written into ``keys`` and ``values`` (batch,
        kv_heads, max_length, head_dim) at positions ``start`` on. ``cos`` and ``sin`` (batch, new, 1, head_dim) as
        :class:`phi_core.rotary.Rotation` holds them. None, with nothing written, where the kernel does not apply."""
        batch, new, width = projected.shape
        kv_heads, dim = keys.shape[1], keys.shape[3]
        if width != (heads + 2 * kv_heads) * dim or keys.stride() != values.stride() or keys.stride(-1) != 1:
            return None
        tensors = (projected, cos, sin, keys, values)
        if any(t.dtype != torch.float32 or not t.is_cpu for t in tensors) or values.shape != keys.shape:
            return None
        if not (projected.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
            return None
        if cos.numel() != batch * new * dim or sin.numel() != cos.numel() or start + new > keys.shape[2]:
            return None
        q = torch.empty(batch, heads, new, dim)
        strides = (ctypes.c_int64 * 3)(*keys.stride()[:3])
        self.lib.phi_rotate_into_cache(
            projected.data_ptr(),
            batch,
            new,
            heads,
            kv_heads,
            dim,
            rotary_dim,
            cos.data_ptr(),
            sin.data_ptr(),
            q.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            ctypes.addressof(strides),
            start,
            torch.get_num_threads(),
        )
        return q

    def gelu_tanh_(self, x: torch.Tensor) -> torch.Tensor:
        """GELU's tanh form (Phi's ``gelu_new``) of a contiguous float32 tensor, in place."""
        self.lib.phi_gelu_tanh(x.data_ptr(), x.numel(), torch.get_num_threads())
        return x


_status: dict[str, str] = {}
_lock = threading.Lock()


def kernel_status(level: Level | None = None) -> str:
    """Why the kernels of ``level`` are or are not in use (after :func:`library` tried)."""
    level = cpu_info().level if level is None else level
    if level == "none":
        return "no AVX2 on this CPU: torch's products"
    library(level)
    return _status.get(level, "not tried")


@functools.cache
def library(level: Level) -> Kernels | None:
    """The compiled kernels of ``level``, built into the cache folder if needed; None if they cannot be had."""
    if level not in COMPILE_FLAGS or os.environ.get("PHI_KERNELS", "1") == "0":
        _status[level] = "disabled by PHI_KERNELS=0" if level in COMPILE_FLAGS else f"no kernels for {level}"
        return None
    with _lock:
        try:
            kernels = _cached(level) or _build(level)
        except (OSError, subprocess.SubprocessError, ValueError) as error:
            _status[level] = f"kernels unavailable ({error}): torch's products"
            return None
    return kernels


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _identity(level: Level) -> dict[str, object]:
    source = SOURCE.read_bytes()
    return {
        "source_sha256": hashlib.sha256(source).hexdigest(),
        "level": level,
        "flags": list(_command_flags(level)),
    }


def _command_flags(level: Level) -> tuple[str, ...]:
    return ("-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", *COMPILE_FLAGS[level])


def _paths(level: Level) -> tuple[Path, Path]:
    digest = hashlib.sha256(json.dumps(_identity(level), sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir()
    return folder / f"cpu_kernels-{level}-{digest}.so", folder / f"cpu_kernels-{level}-{digest}.json"


def _cached(level: Level) -> Kernels | None:
    """The library the cache holds for this source and level, if its manifest checks out and it self-tests."""
    library_path, manifest_path = _paths(level)
    try:
        manifest = json.loads(manifest_path.read_text())
        identity = _identity(level)
        if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in identity.items()):
            return None
        if manifest.get("library_sha256") != hashlib.sha256(library_path.read_bytes()).hexdigest():
            return None
        kernels = Kernels(library_path, level)
        self_test(kernels)
    except (OSError, ValueError, AssertionError, AttributeError):
        return None
    _status[level] = f"{level} kernels from {library_path}"
    return kernels


def _build(level: Level) -> Kernels | None:
    compiler = _compiler()
    if compiler is None:
        _status[level] = f"no C++ compiler ({os.environ.get('CXX', 'c++')} not found): torch's products"
        return None
    library_path, manifest_path = _paths(level)
    library_path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: another process may be loading the same name meanwhile.
    handle, scratch = tempfile.mkstemp(suffix=".so", dir=library_path.parent)
    os.close(handle)
    try:
        command = [compiler, *_command_flags(level), "-o", scratch, str(SOURCE)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            _status[level] = f"compiling the {level} kernels failed ({last}): torch's products"
            return None
        kernels = Kernels(Path(scratch), level)
        self_test(kernels)
        os.replace(scratch, library_path)
    except AssertionError:
        _status[level] = f"the {level} kernels failed their self-test: torch's products"
        return None
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    manifest = {**_identity(level), "library_sha256": hashlib.sha256(library_path.read_bytes()).hexdigest()}
    manifest |= {"compiler": compiler, "cpu": cpu_info().model}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    _status[level] = f"{level} kernels compiled into {library_path}"
    _remove_stale(level, library_path, manifest_path)
    return Kernels(library_path, level)


def _remove_stale(level: Level, *current: Path) -> None:
    """Libraries of this level built from other sources (older phi_core versions rebuild theirs if needed), and
    builds abandoned over an hour ago."""
    folder = current[0].parent
    abandoned = [p for p in folder.glob("tmp*.so") if p.stat().st_mtime < time.time() - 3600]
    for path in [*folder.glob(f"cpu_kernels-{level}-*"), *abandoned]:
        if path not in current:
            with contextlib.suppress(OSError):
                path.unlink()


def attention_in_float64(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None
) -> torch.Tensor:
    """What :meth:`Kernels.attention` computes, in float64 with torch's own operations (its reference)."""
    batch, heads, new, dim = q.shape
    total = k.shape[2]
    k, v = (t.repeat_interleave(heads // k.shape[1], dim=1).double() for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(dim)
    query_pos, key_pos = torch.arange(total - new, total)[:, None], torch.arange(total)[None, :]
    allowed = (key_pos <= query_pos).expand(batch, 1, new, total)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, None, :]) | (key_pos == query_pos)
    probs = scores.masked_fill(~allowed, -math.inf).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(batch, new, heads * dim)


def self_test(kernels: Kernels) -> None:
    """Every product, the attention and GELU of ``kernels`` on small odd shapes against float64: an AssertionError
    if one is wrong."""
    if kernels.lib.phi_kernels_level() != _LEVEL_IDS[kernels.level]:
        raise AssertionError("library built for another level")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 70, generator=generator)
    bias = torch.randn(37, generator=generator)
    for rows in (3, 8, ROUNDED_ROWS + 3):  # the few-row products, the eight-row ones and the many-row ones
        x = torch.randn(rows, 70, generator=generator)
        for kind in KINDS:
            packed, exact, group = pack(kind, weight)
            rounded = rounded_activations(kind, kernels.level, rows)
            seen = x if rounded is None else x.to(rounded)
            expected = seen.double() @ exact.double().T + bias.double()
            got = kernels.linear(kind, x, packed, bias, 37, group).double()
            tolerance = 1e-4 if kind in ("f32", "bf16", "f16") else 0.05  # the integer ones round the activations
            if not (got - expected).abs().max() <= tolerance * expected.abs().max():
                raise AssertionError(f"{kind} product wrong")
    k, v = torch.randn(2, 2, 2, 40, 24, generator=generator)  # grouped: 4 query heads over 2, head size 24
    key_valid = torch.rand(2, 40, generator=generator) > 0.3
    for new in (3, 20):  # one query at a time, and blocks of queries
        q = torch.randn(2, 4, new, 24, generator=generator)
        got = kernels.attention(q, k, v, key_valid)
        if got is None or not (got.double() - attention_in_float64(q, k, v, key_valid)).abs().max() <= 1e-5:
            raise AssertionError("attention wrong")
    x = torch.linspace(-12, 12, 99)
    expected = F.gelu(x.double(), approximate="tanh")
    if not (kernels.gelu_tanh_(x.clone()).double() - expected).abs().max() <= 1e-6:
        raise AssertionError("GELU wrong")


# Memory for the weights ------------------------------------------------------------------------------------------
HUGE_PAGE = 2 << 20


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose whole 2 MB stretches Linux is asked to back with huge pages.

    A decode step streams every weight once. With 4 KB pages the hardware prefetchers stop at every page boundary and
    each page costs a TLB entry; a bfloat16 matrix-vector product over 2 MB pages measured 48.6 GB/s against 45.8 on
    4 KB pages (a 2-core Zen 5). Transparent huge pages are often granted only on request (``madvise`` mode) and only
    to memory never written before, which the allocator's heap does not promise, so the memory is a fresh anonymous
    mapping, 2 MB longer than needed so that an aligned stretch fits (pages never touched cost nothing). Small
    tensors, other systems, or a kernel that declines: the memory is what it would have been.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < 2 * HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    # Private: an anonymous mapping is shared by default, and shared memory gets huge pages under another setting.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    offset = -address % HUGE_PAGE
    with contextlib.suppress(OSError):  # advice only: a refusal changes nothing
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    # The tensor holds a reference to the mapping, which lives as long as the tensor does.
    flat = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def copy_to_huge_pages(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` (converted to ``dtype``) in memory from :func:`empty_on_huge_pages`."""
    out = empty_on_huge_pages(tuple(tensor.shape), dtype or tensor.dtype)
    return out.copy_(tensor)


# Packing ---------------------------------------------------------------------------------------------------------
def pack(kind: str, weight: torch.Tensor, group: int = 64) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, int]:
    """``weight`` (out, in) in ``kind``'s layout, the values it now holds as float32, and its group size."""
    if kind == "f32":
        return (weight.float().contiguous(),), weight.float(), 0
    if kind in ("bf16", "f16"):
        held = weight.to(torch.bfloat16 if kind == "bf16" else torch.float16).contiguous()
        return (held,), held.float(), 0
    if kind == "q8":
        tiles, scales = pack_int8(weight)
        return (tiles, scales), unpack_int8(tiles, scales, *weight.shape), QBLOCK
    tiles, scales = pack_int4(weight, group)
    return (tiles, scales), unpack_int4(tiles, scales, *weight.shape), group


def _padded(weight: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    return F.pad(weight.float(), (0, columns - weight.shape[1], 0, rows - weight.shape[0]))


def _tile_shape(out_features: int, in_features: int, block: int) -> tuple[int, int]:
    return -(-out_features // TILE) * TILE, -(-in_features // block) * block


def pack_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row in 16-row tiles: (uint8 tiles, float32 scales padded to whole tiles)."""
    rows, columns = _tile_shape(*weight.shape, QBLOCK)
    padded = _padded(weight, rows, columns)
    scales = (padded.abs().amax(dim=1) / 127.0).clamp(min=1e-30)
    values = torch.round(padded / scales[:, None]).clamp(-127, 127).to(torch.int16) + 128
    tiles = values.to(torch.uint8).view(rows // TILE, TILE, columns // 4, 4).permute(0, 2, 1, 3).contiguous()
    return tiles.view(-1), scales.contiguous()


def unpack_int8(tiles: torch.Tensor, scales: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The float32 (out, in) matrix int8 tiles hold."""
    rows, columns = _tile_shape(out_features, in_features, QBLOCK)
    values = tiles.view(rows // TILE, columns // 4, TILE, 4).permute(0, 2, 1, 3).reshape(rows, columns)
    return ((values.float() - 128) * scales[:, None])[:out_features, :in_features]


def pack_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit with a float16 scale per row and ``group`` inputs, in 16-row tiles: (uint8 tiles, float16 scales)."""
    if group % QBLOCK:
        raise ValueError(f"int4 group size must be a multiple of {QBLOCK}, not {group}")
    rows, columns = _tile_shape(*weight.shape, group)
    groups = _padded(weight, rows, columns).view(rows, columns // group, group)
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))
    scales = (extreme / -8.0).to(torch.float16)
    held = scales.float()
    inverse = torch.where(held != 0, 1.0 / held, torch.zeros_like(held))
    values = (torch.round(groups * inverse) + 8).clamp(0, 15).to(torch.uint8).view(rows // TILE, TILE, -1, 2, 4)
    tiles = (values[:, :, :, 0] | (values[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()
    tile_scales = scales.view(rows // TILE, TILE, columns // group).permute(0, 2, 1).contiguous()
    return tiles.view(-1), tile_scales.view(-1)


def unpack_int4(
    tiles: torch.Tensor, scales: torch.Tensor, out_features: int, in_features: int, group: int | None = None
) -> torch.Tensor:
    """The float32 (out, in) matrix int4 tiles hold (``group`` is implied by the sizes when not given)."""
    rows = -(-out_features // TILE) * TILE
    columns = tiles.numel() * 2 // rows
    group = group or columns * rows // scales.numel()
    packed = tiles.view(rows // TILE, columns // 8, TILE, 4).permute(0, 2, 1, 3)
    values = torch.stack([packed & 0x0F, packed >> 4], dim=3).reshape(rows, columns).float() - 8
    tile_scales = scales.view(rows // TILE, columns // group, TILE).permute(0, 2, 1).reshape(rows, -1, 1)
    weight = (values.view(rows, -1, group) * tile_scales.float()).view(rows, columns)
    return weight[:out_features, :in_features]
