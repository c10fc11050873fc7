"""Peak memory of `phi convert` on a full-size checkpoint, against the size of its weights.

    python benchmarks/convert_memory.py --shape phi-2 --dtype float16 --workdir /tmp/convert-bench

Writes a random checkpoint of the real shape in the old phi-msft layout (two safetensors shards and an index,
as microsoft/phi-2 was first published), converts it with `phi convert` in a child process, and reports the
child's peak resident memory (its RSS high-water mark) next to the weights' size on disk.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi_core.bench_models import SHAPES


def write_phi_msft(folder: Path, shape: str, dtype: torch.dtype) -> int:
    """A random phi-msft checkpoint of ``shape``; returns the bytes of its weights."""
    config = SHAPES[shape]
    d, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def tensor(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * 0.02).to(dtype)

    blocks = {}
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        blocks |= {
            p + "ln.weight": tensor(d),
            p + "ln.bias": tensor(d),
            p + "mixer.Wqkv.weight": tensor(3 * d, d),
            p + "mixer.Wqkv.bias": tensor(3 * d),
            p + "mixer.out_proj.weight": tensor(d, d),
            p + "mixer.out_proj.bias": tensor(d),
            p + "mlp.fc1.weight": tensor(inner, d),
            p + "mlp.fc1.bias": tensor(inner),
            p + "mlp.fc2.weight": tensor(d, inner),
            p + "mlp.fc2.bias": tensor(d),
        }
    rest = {
        "transformer.embd.wte.weight": tensor(vocab, d),
        "lm_head.ln.weight": tensor(d),
        "lm_head.ln.bias": tensor(d),
        "lm_head.linear.weight": tensor(vocab, d),
        "lm_head.linear.bias": tensor(vocab),
    }
    folder.mkdir(parents=True)
    names = sorted(blocks | rest)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map, total = {}, 0
    everything = blocks | rest
    for index, keys in enumerate(halves, start=1):
        file = f"model-{index:05d}-of-00002.safetensors"
        save_file({k: everything[k] for k in keys}, str(folder / file))
        weight_map |= {k: file for k in keys}
        total += sum(everything[k].numel() * everything[k].element_size() for k in keys)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    raw = {
        "model_type": "phi-msft",
        "n_embd": d,
        "n_head": config.num_attention_heads,
        "n_layer": config.num_hidden_layers,
        "n_inner": None,
        "n_positions": 2048,
        "rotary_dim": config.rotary_dim,
        "vocab_size": vocab,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(raw))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="phi-2", choices=list(SHAPES))
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    source, output = args.workdir / "source", args.workdir / "converted"
    size = write_phi_msft(source, args.shape, getattr(torch, args.dtype))
    phi = Path(sys.executable).with_name("phi")
    start = time.perf_counter()
    subprocess.run([str(phi), "convert", str(source), str(output), "--quiet"], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    report = {
        "shape": args.shape,
        "dtype": args.dtype,
        "weights_bytes": size,
        "peak_rss_bytes": peak,
        "peak_over_weights": round(peak / size, 3),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(report, indent=2))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
