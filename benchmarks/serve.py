"""Throughput and latency of `phi serve` against the number of concurrent clients, on random weights of a real shape.

    python benchmarks/serve.py --shape phi-1.5 --dtype float32 --rounds 2 --json docs/bench/serve-phi-1.5-float32.json
    python benchmarks/serve.py --shape tiny --clients 1 2 4 8 --new-tokens 64

The server runs in a subprocess of its own (this script with --serve), on random weights (phi_core.bench), with the
real Phi tokenizer. Each client is a thread that sends ``--requests`` streaming completions one after another
(random prompts of ``--prompt-tokens`` ids, ``--new-tokens`` greedy tokens, ``ignore_eos``, ``logprobs: 0`` so that
every token arrives as its own chunk). A warm-up request runs first; ``--rounds`` repeats the sweep, the levels
interleaved.

Reported per concurrency level: aggregate generated tokens/s (all tokens over the wall time of the level; the median
over rounds), time to first token p50/p99, inter-token latency p50/p99, the slowest request's decode rate against
the median one (a starved request would show there), and the machine's load average after each round.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class RequestTiming:
    started: float
    first: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return (self.first or self.started) - self.started

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one."""
        span = self.token_times[-1] - self.token_times[0] if len(self.token_times) > 1 else 0.0
        return (len(self.token_times) - 1) / span if span > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else 0.0


def stream_completion(port: int, prompt: list[int], new_tokens: int) -> RequestTiming:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "logprobs": 0,
        "ignore_eos": True,
    }
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    timing = RequestTiming(time.perf_counter())
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        tokens = len(chunk["choices"][0]["logprobs"]["tokens"]) if chunk["choices"][0]["logprobs"] else 0
        now = time.perf_counter()
        if tokens and timing.first is None:
            timing.first = now
        timing.token_times += [now] * tokens
    connection.close()
    return timing


def run_level(port: int, clients: int, requests: int, prompt_tokens: int, new_tokens: int, seed: int):
    """One round at ``clients`` concurrent clients: (wall seconds, every request's timing)."""
    rng = random.Random(seed)
    prompts = [[[rng.randrange(50000) for _ in range(prompt_tokens)] for _ in range(requests)] for _ in range(clients)]
    results: list[list[RequestTiming]] = [[] for _ in range(clients)]

    def client(index: int) -> None:
        for prompt in prompts[index]:
            results[index].append(stream_completion(port, prompt, new_tokens))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, [t for per_client in results for t in per_client]


def summarize(clients: int, rounds: list[tuple[float, list[RequestTiming]]], loads: list[float]) -> dict[str, Any]:
    """Aggregate tokens/s as the median over rounds; latencies pooled over every round's requests."""
    timings = [t for _, round_timings in rounds for t in round_timings]
    rates = [sum(len(t.token_times) for t in round_timings) / wall for wall, round_timings in rounds]
    gaps = [g for t in timings for g in t.gaps]
    decode = [t.decode_rate for t in timings]
    return {
        "clients": clients,
        "requests": len(timings),
        "tokens": sum(len(t.token_times) for t in timings),
        "tokens_per_s": round(statistics.median(rates), 2),
        "tokens_per_s_rounds": [round(r, 2) for r in rates],
        "ttft_p50_s": round(percentile([t.ttft for t in timings], 50), 3),
        "ttft_p99_s": round(percentile([t.ttft for t in timings], 99), 3),
        "inter_token_p50_s": round(percentile(gaps, 50), 4),
        "inter_token_p99_s": round(percentile(gaps, 99), 4),
        "slowest_vs_median_rate": round(min(decode) / statistics.median(decode), 2) if decode else None,
        "load_average": [round(x, 2) for x in loads],
    }


def cpu_description() -> dict[str, Any]:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = re.search(r"Model name:\s*(.+)", text)
    flags = re.search(r"Flags:\s*(.+)", text)
    return {
        "model_name": name.group(1).strip() if name else platform.processor(),
        "cores": os.cpu_count(),
        "avx512": bool(flags and "avx512f" in flags.group(1).split()),
        "avx2": bool(flags and "avx2" in flags.group(1).split()),
    }


def serve_random(args: argparse.Namespace) -> None:
    """The server side (a subprocess): random weights of ``--shape``, the real tokenizer, port 0."""
    from dataclasses import replace

    import phi_core
    from phi_core.bench import SHAPES, random_model
    from phi_core.generation_config import GenerationDefaults
    from phi_core.server import ServeSettings, serve

    def load():
        config = SHAPES[args.shape]
        if args.layers:
            config = replace(config, num_hidden_layers=args.layers)
        model = random_model(config, args.dtype, "cpu", seed=0)
        return model, phi_core.load_tokenizer("tiny"), GenerationDefaults()

    settings = ServeSettings(
        source=f"random {args.shape}",
        name="bench",
        port=0,
        quiet=True,
        max_batch=args.max_batch,
        max_queue=64,
        threads=args.threads,
    )
    serve(settings, load)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, __file__, "--serve", "--shape", args.shape, "--dtype", args.dtype]
    command += ["--max-batch", str(args.max_batch)] + (["--layers", str(args.layers)] if args.layers else [])
    command += ["--threads", str(args.threads)] if args.threads else []
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    port = None
    for line in process.stderr:
        sys.stderr.write(line)
        if found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
            port = int(found.group(1))
        if "ready in" in line:
            break
    if port is None or process.poll() is not None:
        raise SystemExit("the server did not start")
    threading.Thread(target=lambda: [sys.stderr.write(line) for line in process.stderr], daemon=True).start()
    return process, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="phi-1.5", choices=["phi-1", "phi-1.5", "phi-2", "tiny"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers of the same shape")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="sweeps over the client counts; medians reported")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: per core)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_random(args)
        return
    process, port = start_server(args)
    rounds: dict[int, list[tuple[float, list[RequestTiming]]]] = {clients: [] for clients in args.clients}
    loads: dict[int, list[float]] = {clients: [] for clients in args.clients}
    try:
        stream_completion(port, list(range(100, 100 + args.prompt_tokens)), 4)  # warm-up
        for round_index in range(args.rounds):  # levels interleaved, so a change in machine load hits them alike
            for clients in args.clients:
                seed = 1000 * round_index + clients
                wall, timings = run_level(port, clients, args.requests, args.prompt_tokens, args.new_tokens, seed)
                rounds[clients].append((wall, timings))
                loads[clients].append(os.getloadavg()[0])
                tokens = sum(len(t.token_times) for t in timings)
                print(f"round {round_index + 1}: {clients} clients, {tokens / wall:.2f} tokens/s", flush=True)
    finally:
        process.terminate()
        process.wait(120)
    levels = [summarize(clients, rounds[clients], loads[clients]) for clients in args.clients]
    base = levels[0]["tokens_per_s"]
    for level in levels:
        level["speedup_vs_first"] = round(level["tokens_per_s"] / base, 2) if base else None
    report = {
        "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "serve")},
        "cpu": cpu_description(),
        "server_threads": args.threads or os.cpu_count(),
        "levels": levels,
    }
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['cpu']['model_name']}, {report['cpu']['cores']} cores, avx512={report['cpu']['avx512']}")
    print("clients  tokens/s  speedup  ttft p50  ttft p99  itl p50  itl p99  slowest/median  load average")
    for level in report["levels"]:
        print(
            f"{level['clients']:>7}  {level['tokens_per_s']:>8}  {level['speedup_vs_first']:>6}x  "
            f"{level['ttft_p50_s']:>7}s  {level['ttft_p99_s']:>7}s  {level['inter_token_p50_s']:>6}s  "
            f"{level['inter_token_p99_s']:>6}s  {level['slowest_vs_median_rate']:>14}  {level['load_average']}"
        )


if __name__ == "__main__":
    main()
