"""phi_core on a CUDA GPU: logits equal transformers' there, half precision stays close to float32, and generation
(plain, left-padded, prompt lookup, the serving engine, the installed ``phi``) gives the tokens it gives on the CPU.

Every test skips where there is no CUDA device; they run on a lent GPU machine (docs/performance.md says when).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from cli_harness import PHI
from conftest import CONFIGS

import phi_core
from phi_core.generation import GenerationParams, generate

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ATOL = 1e-4
PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef list_files(folder):\n    ", "class Stack:\n"]


@pytest.fixture(autouse=True)
def exact_float32_products(monkeypatch):
    """TF32 would round float32 products to 10 mantissa bits; the oracle comparison needs real float32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["phi-1.5-like", "phi-2-like", "qk-layernorm", "gqa", "rope-dynamic"])
def test_float32_logits_on_cuda_match_transformers(make_checkpoint, variant, attn):
    reference, folder = make_checkpoint(**CONFIGS[variant])
    ours = phi_core.load_model(folder, attn=attn, device="cuda", dtype="float32")
    ids = random_ids(2, 24)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        expected = reference.cuda()(ids.cuda(), attention_mask=mask.cuda()).logits
    got = ours(ids.cuda(), attention_mask=mask.cuda()).logits
    real = mask.bool().cuda()
    assert (got[real] - expected[real]).abs().max() <= ATOL


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_half_precision_on_cuda_stays_close_to_float32(make_checkpoint, dtype, attn):
    _, folder = make_checkpoint(**CONFIGS["phi-2-like"])
    full = phi_core.load_model(folder, device="cuda", dtype="float32")
    half = phi_core.load_model(folder, device="cuda", dtype=dtype, attn=attn)
    ids = random_ids(2, 32).cuda()
    expected = full(ids).logits
    got = half(ids).logits
    assert got.dtype == torch.float32 or got.dtype == getattr(torch, dtype)
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() <= 0.03 * scale


def greedy_tokens(model, tokenizer, prompts: list[str], **settings: object) -> list[list[int]]:
    encoded = [tokenizer.encode(p) for p in prompts]
    rows: dict[int, list[int]] = {}
    params = GenerationParams(max_new_tokens=24, **settings)
    for event in generate(model, tokenizer, encoded, params):
        rows.setdefault(event.row, []).append(event.token_id)
    return [rows[r] for r in range(len(prompts))]


@pytest.fixture(scope="module")
def embedded_pair():
    tokenizer = phi_core.load_tokenizer("tiny")
    cpu = phi_core.load_model("tiny", dtype="float32")
    gpu = phi_core.load_model("tiny", dtype="float32", device="cuda")
    return cpu, gpu, tokenizer


def test_greedy_batch_on_cuda_gives_the_cpu_tokens(embedded_pair):
    cpu, gpu, tokenizer = embedded_pair
    # A batch of prompts of different lengths: left padding, rows finishing on their own, the cache on the GPU.
    assert greedy_tokens(gpu, tokenizer, PROMPTS) == greedy_tokens(cpu, tokenizer, PROMPTS)


def test_prompt_lookup_on_cuda_gives_the_plain_tokens(embedded_pair):
    _, gpu, tokenizer = embedded_pair
    copying = [p + "\n" + p for p in PROMPTS]
    assert greedy_tokens(gpu, tokenizer, copying, lookup=6) == greedy_tokens(gpu, tokenizer, copying)


def test_serving_engine_on_cuda_gives_the_generate_tokens(embedded_pair):
    from phi_core.engine import Engine, EngineRequest, Token

    _, gpu, tokenizer = embedded_pair
    params = GenerationParams(max_new_tokens=24)
    requests = [EngineRequest(tokenizer.encode(p), params) for p in PROMPTS]
    got: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    with Engine(gpu, tokenizer, max_batch=2, max_queue=8) as engine:
        for index, event in engine.run(requests, timeout=120):
            assert isinstance(event, Token)
            got[index].append(event.token_id)
    assert [got[i] for i in range(len(PROMPTS))] == greedy_tokens(gpu, tokenizer, PROMPTS)


def phi(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``phi`` (beside this Python), as a user runs it."""
    return subprocess.run([str(PHI), *args], capture_output=True, text=True, timeout=300)


def test_phi_generate_on_cuda_prints_the_cpu_completion():
    outputs = []
    for device in ("cpu", "cuda"):
        done = phi("generate", PROMPTS[0], "--greedy", "--max-new-tokens", "16", "--json", "--device", device)
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout))
    assert outputs[1]["completion"] == outputs[0]["completion"]


def test_int8_weights_on_cuda_are_a_one_line_error():
    done = phi("generate", "x", "--dtype", "int8", "--device", "cuda", "--max-new-tokens", "2")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0
