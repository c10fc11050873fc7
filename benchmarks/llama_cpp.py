"""phi_core against llama.cpp itself: the same random phi-1.5-shape weights, the same machine, interleaved rounds.

    python benchmarks/llama_cpp.py --llama-dir /tmp/llama.cpp --build          # build llama.cpp first (~15 min)
    python benchmarks/llama_cpp.py --llama-dir /tmp/llama.cpp --work /tmp/phi-vs-llama --rounds 3 \\
        --json docs/bench/llama-cpp-phi-1.5.json

Steps. ``--build`` builds llama.cpp (CPU only) from the source that the ``llama-cpp-python`` package vendors, as
fetched by ``pip download --no-binary :all: llama-cpp-python`` (``cmake`` and a C++ compiler needed; nothing is
installed). A random phi-1.5-shape checkpoint is written in float32 (``benchmarks/decode.py``'s
``write_checkpoint``, with the embedded model's CodeGen tokenizer files) and turned into GGUF files by llama.cpp's
own tools: ``convert_hf_to_gguf.py --outtype f32 / f16 / q8_0`` (run with llama.cpp's ``gguf-py`` on the path)
and ``llama-quantize ... q4_0``. Each round then runs, for each weight size in turn, llama.cpp's ``llama-bench``
(one repetition, ``-t`` = torch's thread count) and phi_core (``phi_core.load_model`` of the same checkpoint at
the matching ``--dtype``, one model at a time) on the same tests, each test of phi_core right before llama.cpp's:

- decode: ``tg N`` in llama-bench (N new tokens from an empty context) against phi_core generating N tokens after
  a one-token prompt (tokens/s over the N - 1 decode steps);
- prefill: ``pp P`` against phi_core's prefill of a P-token prompt (its logits at the last position only, as
  llama.cpp computes them).

Pairs: float32 / f32, bfloat16 and float16 / f16, int8 / q8_0, int4 / q4_0 (llama-quantize keeps the output
matrix in q6_K there; phi_core's int4 quantizes it too). Reported: each side's median tokens/s over the rounds and
the median of the per-round ratios (phi_core over llama.cpp).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import write_checkpoint

import phi_core
from phi_core import kernels
from phi_core.generation import GenerationParams, Timing, generate

PAIRS = {"float32": "f32", "bfloat16": "f16", "float16": "f16", "int8": "q8_0", "int4": "q4_0"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_llama(folder: Path) -> None:
    """llama.cpp's CPU build from the source llama-cpp-python vendors (the steps of a plain CMake build)."""
    with tempfile.TemporaryDirectory() as scratch:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
        subprocess.run([*pip, "-d", scratch, "llama-cpp-python"], check=True)
        archive = next(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
        shutil.unpack_archive(archive, scratch)
        source = next(Path(scratch).glob("llama_cpp_python-*/vendor/llama.cpp"))
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(source, folder)
    configure = ["cmake", "-S", ".", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
    configure += ["-DGGML_OPENMP=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF"]
    subprocess.run(configure, cwd=folder, check=True)
    targets = ["--target", "llama-bench", "llama-quantize"]
    subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count() or 2), *targets], cwd=folder, check=True)


def prepare_models(llama: Path, work: Path) -> tuple[Path, dict[str, Path]]:
    """The random float32 checkpoint and its GGUF files (made once; reused while they exist)."""
    checkpoint = work / "phi-1.5-random"
    if not (checkpoint / "model.safetensors").is_file():
        write_checkpoint("phi-1.5", "float32", checkpoint)
        # 4096 positions, so that a 2048-token prompt and its next token fit (phi-1.5 itself has 2048).
        config = json.loads((checkpoint / "config.json").read_text())
        (checkpoint / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
        embedded = Path(phi_core.__file__).parent / "assets" / "tiny"
        for name in TOKENIZER_FILES:
            shutil.copyfile(embedded / name, checkpoint / name)
    env = {**os.environ, "PYTHONPATH": str(llama / "gguf-py")}
    ggufs = {}
    for kind in ("f32", "f16", "q8_0"):
        ggufs[kind] = work / f"phi-1.5-{kind}.gguf"
        if not ggufs[kind].is_file():
            command = [sys.executable, str(llama / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", kind]
            subprocess.run([*command, "--outfile", str(ggufs[kind])], check=True, env=env, capture_output=True)
    ggufs["q4_0"] = work / "phi-1.5-q4_0.gguf"
    if not ggufs["q4_0"].is_file():
        quantize = [str(llama / "build" / "bin" / "llama-quantize"), str(ggufs["f32"]), str(ggufs["q4_0"]), "q4_0"]
        subprocess.run(quantize, check=True, capture_output=True)
    return checkpoint, ggufs


def llama_bench(llama: Path, gguf: Path, test: str, size: int, threads: int) -> float:
    """tokens/s of one llama-bench repetition of ``tg size`` or ``pp size``."""
    # llama-bench's warm-up run repeats the whole test: worth it before a short decode, not before a long prefill
    sizes = ["-p", "0", "-n", str(size)] if test == "decode" else ["-p", str(size), "-n", "0", "--no-warmup"]
    command = [str(llama / "build" / "bin" / "llama-bench"), "-m", str(gguf), *sizes, "-t", str(threads)]
    done = subprocess.run([*command, "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    return float(json.loads(done.stdout)[0]["avg_ts"])


def phi_run(model: torch.nn.Module, test: str, size: int) -> float:
    """tokens/s of phi_core: decode of ``size`` tokens after a one-token prompt, or the prefill of ``size``."""
    generator = torch.Generator().manual_seed(size)
    prompt = torch.randint(0, 50000, (1 if test == "decode" else size,), generator=generator).tolist()
    timing = Timing()
    params = GenerationParams(max_new_tokens=size if test == "decode" else 1, ignore_eos=True, logprobs=False)
    with torch.no_grad():
        for _ in generate(model, None, [prompt], params, timing):
            pass
    return (size - 1) / timing.decode_s if test == "decode" else size / timing.prefill_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-dir", type=Path, default=Path(os.environ.get("LLAMA_CPP_DIR", "/tmp/llama.cpp")))
    parser.add_argument("--build", action="store_true", help="build llama.cpp into --llama-dir first")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "phi-vs-llama")
    parser.add_argument("--dtype", action="append", choices=list(PAIRS), help="phi_core dtypes (repeatable) [all]")
    parser.add_argument("--decode", type=int, action="append", help="decode lengths (repeatable) [64]")
    parser.add_argument("--prefill", type=int, action="append", help="prefill lengths (repeatable) [512 2048]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.build:
        build_llama(args.llama_dir)
    if not (args.llama_dir / "build" / "bin" / "llama-bench").is_file():
        sys.exit(f"no llama.cpp build in {args.llama_dir}: run with --build (or set LLAMA_CPP_DIR)")
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, ggufs = prepare_models(args.llama_dir, args.work)
    threads = torch.get_num_threads()
    dtypes = args.dtype or list(PAIRS)
    tests = [("decode", n) for n in args.decode or [64]] + [("prefill", n) for n in args.prefill or [512, 2048]]
    measured: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    kernel_text = {}
    loads: dict[tuple[str, str, int], list[float]] = {}  # the machine's 1-minute load average before each pair
    for round_index in range(args.rounds):
        for dtype in dtypes:
            # One phi_core model at a time (all five would need 14 GB), loaded again each round.
            model = phi_core.load_model(checkpoint, dtype=dtype)
            kernel_text[dtype] = model.precision.kernel_text()
            phi_run(model, "decode", 4)  # warm-up
            for test, size in tests:
                loads.setdefault((dtype, test, size), []).append(round(os.getloadavg()[0], 2))
                ours = phi_run(model, test, size)
                theirs = llama_bench(args.llama_dir, ggufs[PAIRS[dtype]], test, size, threads)
                measured.setdefault((dtype, test, size), []).append((ours, theirs))
                print(
                    f"round {round_index + 1} {test} {size} {dtype}: phi_core {ours:.2f} tokens/s, "
                    f"llama.cpp {PAIRS[dtype]} {theirs:.2f} ({ours / theirs:.2f}x)",
                    flush=True,
                )
            del model
            gc.collect()
    rows = []
    for (dtype, test, size), pairs in measured.items():
        rows.append(
            {
                "test": f"{test} {size}",
                "phi_core": dtype,
                "llama_cpp": PAIRS[dtype],
                "phi_core_tokens_per_s": round(statistics.median(p[0] for p in pairs), 2),
                "llama_cpp_tokens_per_s": round(statistics.median(p[1] for p in pairs), 2),
                "ratio": round(statistics.median(p[0] / p[1] for p in pairs), 3),
                "rounds": [[round(a, 2), round(b, 2)] for a, b in pairs],
                "load_average": loads[dtype, test, size],
                "kernel": kernel_text[dtype],
            }
        )
    report = {
        "cpu": kernels.cpu_info().describe(),
        "kernels": kernels.kernel_status(),
        "threads": threads,
        "torch": torch.__version__,
        "rounds": args.rounds,
        "shape": "phi-1.5",
        "date": time.strftime("%Y-%m-%d"),
        "results": rows,
    }
    print("| test | phi_core | tokens/s | llama.cpp | tokens/s | ratio |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['test']} | {row['phi_core']} | {row['phi_core_tokens_per_s']} | {row['llama_cpp']} | "
            f"{row['llama_cpp_tokens_per_s']} | **{row['ratio']:.2f}x** |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
