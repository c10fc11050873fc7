"""`phi serve` as clients see it: the real server in a subprocess on a free port of 127.0.0.1, driven by the official
`openai` client and by lm-evaluation-harness; its answers checked against phi_core run in this process."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import phi_core  # noqa: E402
from phi_core.completion import Completion, complete  # noqa: E402
from phi_core.generation import GenerationParams  # noqa: E402

API_KEY = "test-key"
PHI = Path(sys.executable).with_name("phi")
TASK_DIR = Path(__file__).parent / "data" / "lm_eval_task"
TIMEOUT = 60
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = API_KEY) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)

    def stderr(self) -> str:
        return self.log.read_text()


def start_server(folder: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    """`phi serve` on port 0 of 127.0.0.1; returns once /health answers 200."""
    log = folder / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [str(PHI), "serve", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env={**os.environ, **OFFLINE, **(env or {})},
        )
    deadline = time.monotonic() + TIMEOUT
    while not (found := re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    server = Server(process, int(found.group(1)), log)
    while call(server, "GET", "/health")[0] != 200:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return server


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            server.process.kill()


def call(server: Server, method: str, path: str, body: Any = None, key: str | None = API_KEY, raw: bytes | None = None):
    """(status, parsed JSON or text) of one HTTP request to the server."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    except (ConnectionError, urllib.error.URLError):
        return 0, None
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    running = start_server(
        tmp_path_factory.mktemp("serve"), "--max-batch", "4", "--max-queue", "2", env={"PHI_API_KEY": API_KEY}
    )
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def tiny():
    """The server's model, loaded the same way in this process."""
    return phi_core.load_model("tiny"), phi_core.load_tokenizer("tiny")


def phi_generate(tiny, prompt: str, max_tokens: int) -> Completion:
    """What `phi generate PROMPT --max-new-tokens N` computes (greedy)."""
    model, tokenizer = tiny
    results = complete(model, tokenizer, [prompt], GenerationParams(max_new_tokens=max_tokens, logprobs=False))
    return next(item for item in results if isinstance(item, Completion))


def token_ids(choice: Any) -> list[int]:
    """Token ids of a choice asked for with logprobs=0 and return_tokens_as_token_ids."""
    return [int(token.removeprefix("token_id:")) for token in choice.logprobs.tokens]


# Greedy as `phi generate` runs it by default. The server takes omitted settings from the checkpoint's
# generation_config.json, as transformers does: the embedded model's has repetition_penalty 1.2.
PLAIN = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}
GREEDY = {
    "temperature": 0,
    "logprobs": 0,
    "extra_body": {"repetition_penalty": 1.0, "return_tokens_as_token_ids": True},
}


def test_plain_and_streamed_completions_equal_phi_generate(server, tiny):
    expected = phi_generate(tiny, "def fibonacci(n):", 24)
    result = server.client().completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=24, **GREEDY)
    choice = result.choices[0]
    assert token_ids(choice) == expected.tokens and choice.text == expected.completion
    assert choice.finish_reason == "length" and result.object == "text_completion"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (expected.prompt_tokens, 24)
    chunks = list(
        server.client().completions.create(
            model="tiny", prompt="def fibonacci(n):", max_tokens=24, stream=True, **PLAIN
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.completion
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_stream_ends_with_done_and_usage(server):
    body = {"model": "tiny", "prompt": "import os", "max_tokens": 5, "stream": True}
    body["stream_options"] = {"include_usage": True}
    status, text = call(server, "POST", "/v1/completions", body)
    assert status == 200
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5


def test_greedy_tokens_identical_when_joining_a_running_batch(server, tiny):
    """A long request streams; others of other lengths and sampling settings join it mid-flight (and a bad request
    comes and goes); the greedy ones keep phi generate's tokens exactly, the seeded one its own alone."""
    client = server.client()
    long_prompt = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):"
    results: dict[str, Any] = {}
    ended: dict[str, float] = {}
    started = threading.Event()

    def first() -> None:
        stream = client.completions.create(
            model="tiny", prompt="def fibonacci(n):", max_tokens=150, stream=True, **GREEDY
        )
        ids = []
        for chunk in stream:
            ids += token_ids(chunk.choices[0])
            if len(ids) >= 4:
                started.set()
        results["first"], ended["first"] = ids, time.monotonic()

    def join(name: str, **request: Any) -> None:
        results[name] = client.completions.create(model="tiny", **request).choices[0]
        ended[name] = time.monotonic()

    jobs = [threading.Thread(target=first)]
    jobs[0].start()
    assert started.wait(TIMEOUT)
    sampled = {"prompt": "x =", "max_tokens": 30, "temperature": 0.9, "top_p": 0.95, "seed": 5}
    joiners = {
        "long": {"prompt": long_prompt, "max_tokens": 20, **GREEDY},
        "short": {"prompt": "import", "max_tokens": 40, **GREEDY},
        "sampled": sampled,
    }
    for name, request in joiners.items():
        jobs.append(threading.Thread(target=join, args=(name,), kwargs=request))
        jobs[-1].start()
    assert call(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 2})[0] == 400
    for job in jobs:
        job.join(TIMEOUT)
    assert all(ended[name] < ended["first"] for name in joiners)  # they ran beside it, not after it
    assert results["first"] == phi_generate(tiny, "def fibonacci(n):", 150).tokens
    assert token_ids(results["long"]) == phi_generate(tiny, long_prompt, 20).tokens
    assert token_ids(results["short"]) == phi_generate(tiny, "import", 40).tokens
    again = client.completions.create(model="tiny", **sampled).choices[0]
    assert results["sampled"].text == again.text


COPYING = "def area(width, height):\n    return width * height\n\n\ndef area("  # greedy output copies the prompt


def test_a_requests_prompt_lookup_keeps_the_greedy_tokens_and_is_counted(server, tiny):
    """The server runs without --lookup; a request's own `lookup` turns it on for that request: the same tokens,
    plain and streamed, and /metrics counts the tokens proposed and kept."""
    before = [metric(server, f"phi_speculative_{kind}_tokens_total") for kind in ("proposed", "accepted")]
    expected = phi_generate(tiny, COPYING, 48)
    looked_up = {"extra_body": {**GREEDY["extra_body"], "lookup": 8}}
    result = server.client().completions.create(model="tiny", prompt=COPYING, max_tokens=48, **GREEDY | looked_up)
    assert token_ids(result.choices[0]) == expected.tokens and result.choices[0].text == expected.completion
    plain = {"extra_body": {**PLAIN["extra_body"], "lookup": 8}}
    stream = server.client().completions.create(
        model="tiny", prompt=COPYING, max_tokens=48, stream=True, **PLAIN | plain
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == expected.completion
    proposed, accepted = (metric(server, f"phi_speculative_{kind}_tokens_total") for kind in ("proposed", "accepted"))
    assert proposed > before[0] and accepted > before[1] and accepted - before[1] <= proposed - before[0]


def test_n_choices_and_seed(server):
    client = server.client()
    request = {"model": "tiny", "prompt": "def main():", "max_tokens": 16, "temperature": 1.0, "seed": 7}
    three = client.completions.create(n=3, **request)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.text for c in three.choices}) > 1
    assert [c.text for c in client.completions.create(n=3, **request).choices] == [c.text for c in three.choices]
    assert client.completions.create(**request).choices[0].text == three.choices[0].text
    assert 3 <= three.usage.completion_tokens <= 48 and three.usage.prompt_tokens == 3


def test_several_prompts_as_strings_and_token_ids(server, tiny):
    _, tokenizer = tiny
    client = server.client()
    prompts = ["import os", "def add(a, b):"]
    single = [
        client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text for p in prompts
    ]
    as_text = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0)
    as_ids = client.completions.create(
        model="tiny", prompt=[tokenizer.encode(p) for p in prompts], max_tokens=8, temperature=0
    )
    assert [c.text for c in as_text.choices] == [c.text for c in as_ids.choices] == single
    one = client.completions.create(model="tiny", prompt=tokenizer.encode(prompts[1]), max_tokens=8, temperature=0)
    assert one.choices[0].text == single[1]


def test_stop_string_across_tokens(server, tiny):
    _, tokenizer = tiny
    client = server.client()
    full = client.completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=30, **GREEDY).choices[0]
    pieces = [tokenizer.decode([t]) for t in token_ids(full)]
    boundary = len(pieces[0]) + len(pieces[1])  # the end of the second token
    stop = full.text[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and full.text.index(stop) > 0
    stopped = client.completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=30, stop=stop, **PLAIN)
    assert stopped.choices[0].text == full.text[: full.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="def fibonacci(n):", max_tokens=30, stop=[stop], stream=True, **PLAIN
    )
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text


def test_echo_logprobs_are_the_models_log_softmax(server, tiny):
    model, tokenizer = tiny
    prompt = "def add(a, b):\n    return"
    client = server.client()
    as_ids = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, **GREEDY | {"logprobs": 3})
    everything = token_ids(as_ids.choices[0])
    ids = tokenizer.encode(prompt)
    assert everything[: len(ids)] == ids and len(everything) == len(ids) + 3
    choice = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=3, **PLAIN
    ).choices[0]
    logprobs = choice.logprobs
    assert choice.text == prompt + tokenizer.decode(everything[len(ids) :])
    assert logprobs.tokens == [tokenizer.decode([t]) for t in everything] and "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = torch.log_softmax(model(torch.tensor([everything])).logits[0].float(), dim=-1)
    for position in range(1, len(everything)):
        row = expected[position - 1]
        assert logprobs.token_logprobs[position] == pytest.approx(float(row[everything[position]]), abs=1e-4)
        best = [tokenizer.decode([t]) for t in torch.topk(row, 3).indices.tolist()]
        assert set(best) <= set(logprobs.top_logprobs[position])
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[len(ids)] == len(prompt)
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, **PLAIN)
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None


def test_max_tokens_zero_with_echo_scores_the_prompt(server, tiny):
    _, tokenizer = tiny
    ids = tokenizer.encode("import os\nimport sys")
    status, body = call(
        server,
        "POST",
        "/v1/completions",
        {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1},
    )
    assert status == 200
    choice = body["choices"][0]
    assert choice["text"] == "import os\nimport sys" and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "logprobs": 50}, "logprobs"),
        ({"model": "tiny", "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": "tiny", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": "tiny", "prompt": "x", "stop": [""]}, "stop"),
        ({"model": "tiny", "prompt": "x", "no_such_field": 1}, "no_such_field"),
        ({"model": "tiny", "prompt": [[1, 2], []]}, "prompt"),
        ({"model": "tiny", "prompt": [70000]}, "prompt"),
        ({"model": "tiny", "prompt": [1] * 1100, "max_tokens": 1}, "prompt"),
        ({"model": "tiny", "prompt": [1] * 1000, "max_tokens": 100}, "max_tokens"),
        ({"prompt": "x"}, "model"),
        ({"model": "tiny", "prompt": "x", "lookup": -1}, "lookup"),
        ({"model": "tiny", "prompt": "x", "lookup": "4"}, "lookup"),
        ({"model": "tiny", "prompt": "x", "lookup": 2.5}, "lookup"),
    ],
)
def test_invalid_requests_are_400_naming_the_parameter(server, body, param):
    status, answer = call(server, "POST", "/v1/completions", body)
    assert status == 400
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"]


def test_other_error_statuses(server):
    assert call(server, "POST", "/v1/completions", raw=b"{not json")[0] == 400
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
    assert call(server, "GET", "/v1/models", key=None)[0] == 401
    with pytest.raises(openai.NotFoundError) as missing:
        server.client().completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert missing.value.body["param"] == "model"
    assert call(server, "GET", "/no/such/route")[0] == 404


def test_full_queue_is_429_and_a_cancelled_request_frees_its_rows(server):
    client = server.client()
    hog = client.completions.create(  # 4 rows and 2 waiting: the whole capacity
        model="tiny", prompt="x", n=6, max_tokens=900, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(hog))
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert batch_size(server) > 0
    hog.close()  # the client goes away: its rows leave at the next step
    deadline = time.monotonic() + TIMEOUT
    while batch_size(server) or queue_depth(server):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).choices[0].finish_reason


def test_a_client_that_goes_away_frees_its_row(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 900, "ignore_eos": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {API_KEY}"})
    deadline = time.monotonic() + TIMEOUT
    while not batch_size(server):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    connection.close()  # without reading the answer
    while batch_size(server):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "prompt=1 completion=" in server.stderr()


def metric(server: Server, name: str) -> float:
    text = call(server, "GET", "/metrics", key=None)[1]
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def batch_size(server: Server) -> float:
    return metric(server, "phi_batch_size")


def queue_depth(server: Server) -> float:
    return metric(server, "phi_queue_depth")


def test_models_tokenizer_endpoints_metrics_and_log(server, tiny):
    _, tokenizer = tiny
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    status, tokens = call(server, "POST", "/tokenize", {"prompt": "def f(x):", "add_special_tokens": False}, key=None)
    assert status == 200 and tokens["tokens"] == tokenizer.encode("def f(x):")
    assert call(server, "POST", "/detokenize", {"tokens": tokens["tokens"]}, key=None)[1] == {"prompt": "def f(x):"}
    info = call(server, "GET", "/tokenizer_info", key=None)[1]
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 1024
    call(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    text = call(server, "GET", "/metrics", key=None)[1]
    for name in ("phi_requests_total{", "phi_prompt_tokens_total", "phi_generation_tokens_total", "phi_queue_depth"):
        assert name in text
    assert "phi_time_to_first_token_seconds_bucket" in text and "phi_inter_token_latency_seconds_count" in text
    assert metric(server, "phi_generation_tokens_total") >= 2
    assert re.search(r'"POST /v1/completions" 200 \S+s prompt=1 completion=2', server.stderr())


def test_health_and_completions_503_while_loading():
    """The app before the model is attached (in process: the loading window of a real server is too short to hit)."""
    import uvicorn

    from phi_core.generation_config import GenerationDefaults
    from phi_core.server import ModelService, _bind, create_app

    service = ModelService("tiny")
    sock = _bind("127.0.0.1", 0)
    loading = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=loading.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    server = Server(None, sock.getsockname()[1], Path("/dev/null"))  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + TIMEOUT
        while (status := call(server, "GET", "/health")[0]) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status == 503
        status, body = call(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x"})
        assert status == 503 and body["error"]["code"] == "loading"
        service.attach(phi_core.load_model("tiny"), phi_core.load_tokenizer("tiny"), GenerationDefaults())
        assert call(server, "GET", "/health")[0] == 200
    finally:
        loading.should_exit = True
        thread.join(TIMEOUT)
        if service.engine is not None:
            service.engine.shutdown()


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch):
    from typer.testing import CliRunner

    import phi_core.server
    from phi_cli.main import app

    monkeypatch.setattr(phi_core.server, "HAVE_SERVE_EXTRA", False)
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1 and "pip install 'phi-toolkit[serve]'" in result.output


def test_sigterm_finishes_running_requests_and_exits_0(tmp_path):
    server = start_server(tmp_path, "--shutdown-timeout", "20")
    try:
        stream = server.client().completions.create(
            model="tiny", prompt="def main():", max_tokens=60, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        next(chunks)
        server.process.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        assert server.process.wait(TIMEOUT) == 0
        assert "SIGTERM" in server.stderr() and "phi serve: stopped" in server.stderr()
        assert call(server, "GET", "/health")[0] == 0  # no longer listening
    finally:
        stop_server(server)


# lm-evaluation-harness ------------------------------------------------------------------------------------------
def test_lm_eval_loglikelihood_scores_equal_in_process(server, tiny, tmp_path, monkeypatch):
    """`lm_eval --model local-completions` against the server scores the local task exactly as the same task
    scored in process on the same model (per-sample log-likelihoods and the metrics)."""
    pytest.importorskip("lm_eval")
    output = tmp_path / "out"
    command = [
        str(Path(sys.executable).with_name("lm_eval")),
        "--model",
        "local-completions",
        "--model_args",
        f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=remote,max_length=1024",
        "--include_path",
        ".",
        "--tasks",
        "phi_serve_python",
        "--output_path",
        str(output),
        "--log_samples",
    ]
    env = {**os.environ, **OFFLINE, "OPENAI_API_KEY": API_KEY, "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    run = subprocess.run(command, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    remote_results = json.loads(next(output.rglob("results_*.json")).read_text())["results"]["phi_serve_python"]
    remote_samples = [json.loads(line) for line in next(output.rglob("samples_*.jsonl")).read_text().splitlines()]

    monkeypatch.chdir(TASK_DIR)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    local = in_process_scores(tiny)
    local_results = local["results"]["phi_serve_python"]
    for name in ("acc,none", "acc_norm,none"):
        assert remote_results[name] == local_results[name]
    local_samples = {s["doc_id"]: s for s in local["samples"]["phi_serve_python"]}
    assert len(remote_samples) == len(local_samples) == 10
    for sample in remote_samples:
        theirs = [float(r[0][0]) for r in sample["resps"]]
        ours = [float(r[0][0]) for r in local_samples[sample["doc_id"]]["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)


def in_process_scores(tiny) -> dict[str, Any]:
    """The task scored by lm_eval on phi_core in this process: the same requests, no server."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = tiny

    class InProcess(TemplateLM):
        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return tokenizer.encode(string)

        def _loglikelihood_tokens(self, requests, **kwargs: Any) -> list[tuple[float, bool]]:
            answers = []
            for _, context, continuation in requests:
                ids = context + continuation
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
                rows = logprobs[len(context) - 1 : len(ids) - 1]
                chosen = rows.gather(1, torch.tensor(continuation)[:, None]).squeeze(1)
                greedy = bool((rows.argmax(dim=-1) == torch.tensor(continuation)).all())
                answers.append((float(chosen.sum()), greedy))
            return answers

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            raise NotImplementedError

    return simple_evaluate(
        model=InProcess(),
        tasks=["phi_serve_python"],
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        log_samples=True,
    )
