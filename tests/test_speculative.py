"""Speculative decoding: greedy output token for token the same as plain decoding, sampled output distributed exactly
as plain sampling's, the KV cache after rollbacks equal to a fresh prefill, and the parts (prompt lookup, the
acceptance rules, the planner, the CLI flags)."""

from __future__ import annotations

import inspect
import json
import math
import shutil
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import phi_core
from phi_cli.main import app
from phi_core import speculative
from phi_core.generation import GenerationParams, SamplingParams, Timing, generate, next_token_distribution
from phi_core.speculative import (
    Draft,
    Planner,
    PromptLookup,
    RowCache,
    StepCosts,
    accept_greedy,
    accept_sampled,
    expected_tokens,
)


@pytest.fixture
def always_propose(monkeypatch):
    """Propose as much as allowed at every step, whatever it costs (the planner would stop a useless draft)."""
    monkeypatch.setattr(Planner, "plan", lambda self, available: min(self.most, max(available, default=0)))


def run(model, tokenizer, prompts, params):
    """Every row's (token, text, finish reason, logprob) in order, and the timing with the speculation counts."""
    rows, timing = {}, Timing()
    for event in generate(model, tokenizer, prompts, params, timing):
        rows.setdefault(event.row, []).append((event.token_id, event.text, event.finish_reason, event.logprob))
    return [rows[r] for r in range(len(prompts))], timing


def assert_same(plain, speculated):
    for alone, fast in zip(plain, speculated, strict=True):
        assert [e[:3] for e in fast] == [e[:3] for e in alone]
        assert max(abs(a[3] - b[3]) for a, b in zip(alone, fast, strict=True)) < 1e-3


# Greedy: the same tokens ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded():
    model, tokenizer = phi_core.load_model("tiny"), phi_core.load_tokenizer("tiny")
    sources = [inspect.getsource(f) for f in (textwrap.dedent, textwrap.indent, json.dumps, shutil.copyfile)]
    prompts = []
    for source in sources:
        head = source.split("\n")[0]
        prompts.append(source[:1200] + "\n\n# The same function, again:\n" + head + "\n")  # copies
        prompts.append(head + "\n")  # does not
    encoded = [tokenizer.encode(p)[-250:] for p in prompts]
    drafts = {
        "int8": Draft(phi_core.load_model("tiny", dtype="int8"), tokens=3, name="int8 copy"),
        "int4": Draft(phi_core.load_model("tiny", dtype="int4"), tokens=5, name="int4 copy"),
    }
    return model, tokenizer, encoded, drafts


SPECULATION = ["lookup 2", "lookup 8", "draft int8", "draft int4"]
ENDINGS = {
    "length": dict(max_new_tokens=30),
    "own limits": dict(max_new_tokens=40, max_length=270),  # rows of different prompt lengths get different limits
    "stop and eos": dict(max_new_tokens=40, stop=("):", "\n\n\n"), eos_token_ids=(50256, 628)),  # 628: "\n\n"
    "repetition penalty": dict(max_new_tokens=30, sampling=SamplingParams(repetition_penalty=1.2)),
}


def speculation(kind: str, drafts: dict[str, Draft]) -> dict[str, object]:
    how, value = kind.split()
    return {"lookup": int(value)} if how == "lookup" else {"draft": drafts[value]}


@pytest.mark.parametrize("kind", SPECULATION)
@pytest.mark.parametrize("ending", list(ENDINGS))
@pytest.mark.parametrize("rows", [[0], [1, 0, 3], [5, 2, 7, 0, 4, 1, 6, 3]])
def test_greedy_output_is_the_same_token_for_token(embedded, always_propose, kind, ending, rows):
    model, tokenizer, encoded, drafts = embedded
    prompts = [encoded[i] for i in rows]
    params = GenerationParams(**ENDINGS[ending])
    plain, _ = run(model, tokenizer, prompts, params)
    fast, timing = run(model, tokenizer, prompts, GenerationParams(**ENDINGS[ending], **speculation(kind, drafts)))
    assert_same(plain, fast)
    assert sum(s.proposed for s in timing.speculation) > 0
    assert all(s.accepted <= s.proposed for s in timing.speculation)


def test_rows_accept_different_lengths_and_finish_mid_draft(embedded, always_propose):
    model, tokenizer, encoded, _ = embedded
    prompts = [encoded[0], encoded[1], encoded[2], encoded[3]]
    params = dict(max_new_tokens=25, stop=("(",), eos_token_ids=(50256, 198))
    plain, _ = run(model, tokenizer, prompts, GenerationParams(**params))
    fast, timing = run(model, tokenizer, prompts, GenerationParams(**params, lookup=6))
    assert_same(plain, fast)
    assert sum(s.accepted for s in timing.speculation) > 0
    lengths = {len(row) for row in plain}
    assert len(lengths) > 1 and min(lengths) < 25  # rows ended apart, before their limit


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """A random model of vocabulary 320, and as its draft the same weights with noise (agreeing on some tokens)."""
    from conftest import hf_model

    folders = []
    for noise in (0.0, 0.2):
        folder = tmp_path_factory.mktemp("spec")
        reference = hf_model(seed=21, max_position_embeddings=256, initializer_range=0.1)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for param in reference.parameters():
                param += noise * param.std() * torch.randn(param.shape, generator=generator)
        reference.save_pretrained(folder)
        folders.append(folder)
    return phi_core.load_model(folders[0]), phi_core.load_model(folders[1])


@pytest.mark.parametrize("how", [{"lookup": 5}, {"draft": 4}, {"draft": 1}])
def test_greedy_is_the_same_with_a_draft_that_disagrees_often(random_models, always_propose, how):
    model, other = random_models
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for length in (5, 17, 40, 9, 28, 3):
        part = torch.randint(0, 320, (length,), generator=generator).tolist()
        prompts.append(part + part[: length // 2])
    extra = {"lookup": how["lookup"]} if "lookup" in how else {"draft": Draft(other, tokens=how["draft"])}
    for ending in ({"max_new_tokens": 48}, {"max_new_tokens": 48, "eos_token_ids": (7, 19)}):
        plain, _ = run(model, None, prompts, GenerationParams(**ending))
        fast, timing = run(model, None, prompts, GenerationParams(**ending, **extra))
        assert_same(plain, fast)
        stats = [s for s in timing.speculation if s.proposed]
        assert stats and any(s.accepted < s.proposed for s in stats)  # some rejections, some acceptances
        assert any(s.accepted for s in stats)


def test_a_full_cache_is_compacted_and_grown_without_changing_the_output(random_models, always_propose, monkeypatch):
    model, other = random_models
    monkeypatch.setattr(RowCache, "SLACK", 2)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 320, (n,), generator=generator).tolist() * 2 for n in (4, 11, 6)]
    compactions = []
    original = RowCache.compact
    monkeypatch.setattr(RowCache, "compact", lambda self: (compactions.append(1), original(self)))
    plain, _ = run(model, None, prompts, GenerationParams(max_new_tokens=60))
    fast, _ = run(model, None, prompts, GenerationParams(max_new_tokens=60, draft=Draft(other, tokens=6)))
    assert_same(plain, fast)
    assert compactions


# Sampling: the same distribution ------------------------------------------------------------------------------------
VOCAB = 16
SAMPLING = SamplingParams(temperature=0.9, top_k=12, repetition_penalty=1.3, seed=1234)
PROMPT = [3, 5, 7, 3, 5, 9, 3, 5]


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    from conftest import hf_model

    models = []
    for seed in (31, 32):
        folder = tmp_path_factory.mktemp(f"vocab{seed}")
        hf_model(seed=seed, vocab_size=VOCAB, hidden_size=32).save_pretrained(folder)
        models.append(phi_core.load_model(folder))
    return models


def exact_joint(model, prompt, new, params):
    """P(t1 .. t_new) over every sequence of ``new`` tokens, (VOCAB,) * new, by enumerating the prefixes."""
    joint = torch.ones(())
    prefixes = torch.zeros((1, 0), dtype=torch.long)
    for _ in range(new):
        ids = torch.cat((torch.tensor(prompt).expand(len(prefixes), -1), prefixes), dim=1)
        with torch.no_grad():
            logits = model(ids).logits[:, -1]
        seen = torch.zeros((len(ids), VOCAB), dtype=torch.bool).scatter_(1, ids, True)
        probs = next_token_distribution(logits, seen, params).double()
        joint = (joint.reshape(-1, 1) * probs).reshape(*joint.shape, VOCAB)
        grid = torch.arange(VOCAB).repeat(len(prefixes))
        prefixes = torch.cat((prefixes.repeat_interleave(VOCAB, dim=0), grid[:, None]), dim=1)
    return joint


def sampled_sequences(model, params, rows):
    out = torch.zeros((rows, params.max_new_tokens), dtype=torch.long)
    column = [0] * rows
    for event in generate(model, None, [PROMPT] * rows, params):
        out[event.row, column[event.row]] = event.token_id
        column[event.row] += 1
    return out


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """The statistic over cells expecting >= 5 draws (the rest pooled), and the value it exceeds with probability
    about 3e-5 for its degrees of freedom (Wilson-Hilferty)."""
    big = expected >= 5
    observed = torch.cat((counts[big], counts[~big].sum()[None]))
    wanted = torch.cat((expected[big], expected[~big].sum()[None]))
    statistic = float(((observed - wanted) ** 2 / wanted.clamp(min=1e-9)).sum())
    freedom = len(wanted) - 1
    limit = freedom * (1 - 2 / (9 * freedom) + 4.0 * math.sqrt(2 / (9 * freedom))) ** 3
    return statistic, limit


def pair_checks(samples, joint):
    """(statistic, limit) for the pairs of consecutive tokens, and for the last token alone."""
    checks = []
    new = joint.dim()
    for first in range(new - 1):
        pair = joint.sum(dim=[d for d in range(new) if d not in (first, first + 1)])
        counts = torch.zeros(VOCAB * VOCAB, dtype=torch.float64)
        counts.index_add_(0, samples[:, first] * VOCAB + samples[:, first + 1], torch.ones(len(samples)).double())
        checks.append(chi_square(counts, pair.flatten() * len(samples)))
    last = joint.sum(dim=list(range(new - 1)))
    checks.append(chi_square(torch.bincount(samples[:, -1], minlength=VOCAB).double(), last * len(samples)))
    return checks


@pytest.mark.parametrize("how", ["lookup", "draft"])
def test_sampled_output_has_the_models_distribution(tiny_vocab, always_propose, how):
    model, other = tiny_vocab
    rows = 6000
    params = GenerationParams(max_new_tokens=4, sampling=SAMPLING, logprobs=False)
    fast = GenerationParams(
        max_new_tokens=4, sampling=SAMPLING, logprobs=False, **({"lookup": 3} if how == "lookup" else {})
    )
    if how == "draft":
        fast = GenerationParams(max_new_tokens=4, sampling=SAMPLING, logprobs=False, draft=Draft(other, tokens=3))
    joint = exact_joint(model, PROMPT, 4, SAMPLING)
    for statistic, limit in pair_checks(sampled_sequences(model, params, rows), joint):
        assert statistic < limit  # the test itself agrees with plain sampling
    for statistic, limit in pair_checks(sampled_sequences(model, fast, rows), joint):
        assert statistic < limit


def test_the_distribution_test_catches_a_draft_accepted_blindly(tiny_vocab, always_propose, monkeypatch):
    model, other = tiny_vocab

    def accept_all(probs, drafted, counts, draft_probs, generator):
        tokens, accepted = accept_sampled(probs, drafted, counts, draft_probs, generator)
        tokens[:, : drafted.shape[1]] = drafted
        return tokens, torch.maximum(accepted, counts)

    monkeypatch.setattr("phi_core.generation.accept_sampled", accept_all)
    params = GenerationParams(max_new_tokens=4, sampling=SAMPLING, logprobs=False, draft=Draft(other, tokens=3))
    checks = pair_checks(sampled_sequences(model, params, 6000), exact_joint(model, PROMPT, 4, SAMPLING))
    assert any(statistic > 2 * limit for statistic, limit in checks)


# The KV cache after rollbacks equals a fresh prefill ------------------------------------------------------------
def test_rolled_back_rows_equal_a_fresh_prefill_of_what_they_kept(random_models):
    model, _ = random_models
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 320, (n,), generator=generator).tolist() for n in (3, 9, 6)]
    kept_tokens = [list(p) for p in prompts]
    rows, ids = RowCache.start(model, prompts, room=4)
    rows.prefill(model, ids)
    # (tokens fed, which of them are real, how many each row keeps): rows keep different counts, with holes
    passes = [
        (4, [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], [4, 1, 2]),
        (3, [[1, 1, 1], [1, 1, 1], [0, 1, 1]], [1, 3, 2]),
        (5, [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], [2, 1, 5]),
        (2, [[1, 1], [1, 1], [1, 1]], [2, 0, 1]),
    ]
    for width, valid, kept in passes:
        tokens = torch.randint(0, 320, (3, width), generator=generator)
        valid = torch.tensor(valid, dtype=torch.bool)
        rows.reserve(width)  # the cache is full by the second pass: compacted, then grown
        since = rows.cache.length
        with torch.no_grad():
            rows.feed(model, tokens, valid)
        rows.rollback(since, torch.tensor(kept))
        for row in range(3):
            kept_tokens[row] += tokens[row][valid[row]][: kept[row]].tolist()
    last = torch.randint(0, 320, (3, 1), generator=generator)
    with torch.no_grad():
        logits = rows.feed(model, last)[:, -1]
    for row in range(3):
        sequence = torch.tensor([kept_tokens[row] + last[row].tolist()])
        fresh_cache = model.new_cache(1, sequence.shape[1])
        with torch.no_grad():
            fresh = model(sequence, cache=fresh_cache).logits[0, -1]
        assert (logits[row] - fresh).abs().max() < 1e-4
        assert int(rows.positions[row]) == sequence.shape[1]
        columns = rows.mask[row, : rows.cache.length].nonzero().flatten()
        for layer in range(len(fresh_cache.keys)):
            assert (rows.cache.keys[layer][row][:, columns] - fresh_cache.keys[layer][0]).abs().max() < 1e-4
            assert (rows.cache.values[layer][row][:, columns] - fresh_cache.values[layer][0]).abs().max() < 1e-4


def test_compacting_moves_each_rows_columns_together(random_models):
    model, _ = random_models
    rows, ids = RowCache.start(model, [[1, 2, 3], [4, 5]], room=6)
    rows.prefill(model, ids)
    rows.feed(model, torch.tensor([[6, 7, 8], [9, 10, 11]]), torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool))
    length = rows.cache.length
    before = [rows.cache.keys[0][r][:, :length][:, rows.mask[r, :length]].clone() for r in range(2)]
    assert rows.holes() == 1 + 2  # row 1's padding column and its two hidden ones
    rows.compact()
    assert rows.cache.length == 6 and rows.holes() == 3
    assert rows.mask[:, :6].tolist() == [[True] * 6, [False] * 3 + [True] * 3]
    for r in range(2):
        assert torch.equal(rows.cache.keys[0][r][:, :6][:, rows.mask[r, :6]], before[r])


# The serving engine (phi serve) -------------------------------------------------------------------------------------
def test_engine_prompt_lookup_gives_the_same_greedy_tokens_with_rows_joining(embedded, always_propose, monkeypatch):
    from phi_core.engine import Engine, EngineRequest, Token

    model, tokenizer, encoded, drafts = embedded
    monkeypatch.setattr("phi_core.engine._RunningBatch._compact", _counting(compactions := []))
    endings = [ENDINGS["length"], ENDINGS["stop and eos"], ENDINGS["repetition penalty"], ENDINGS["own limits"]]
    requests = [EngineRequest(encoded[i], GenerationParams(**endings[i % 4])) for i in range(8)]
    expected = [run(model, tokenizer, [r.prompt], r.params)[0][0] for r in requests]
    with Engine(model, tokenizer, max_batch=3, max_queue=8, lookup=6) as engine:
        got: dict[int, list] = {i: [] for i in range(len(requests))}
        for index, event in engine.run(requests, timeout=120):
            assert isinstance(event, Token)
            got[index].append((event.token_id, event.text, event.finish_reason, event.logprob))
    for index in range(len(requests)):
        assert [e[:3] for e in got[index]] == [e[:3] for e in expected[index]]
    assert compactions  # rows kept different counts until the cache was full
    with pytest.raises(ValueError, match="draft"), Engine(model, tokenizer) as engine:
        engine.submit([EngineRequest(encoded[0], GenerationParams(draft=drafts["int8"]))])


def _counting(calls: list) -> object:
    from phi_core.engine import _RunningBatch

    original = _RunningBatch._compact

    def compact(self) -> int:
        freed = original(self)
        calls.append(freed)
        return freed

    return compact


def test_engine_sampling_with_lookup_keeps_each_rows_seed(embedded, always_propose):
    from phi_core.engine import Engine, EngineRequest, Token

    model, tokenizer, encoded, _ = embedded
    params = GenerationParams(max_new_tokens=24, sampling=SamplingParams(temperature=0.8, seed=11), lookup=4)
    with Engine(model, tokenizer, max_batch=2) as engine:
        first = [e.token_id for _, e in engine.run([EngineRequest(encoded[0], params)]) if isinstance(e, Token)]
        both = {0: [], 1: []}
        for index, event in engine.run([EngineRequest(encoded[0], params), EngineRequest(encoded[2], params)]):
            both[index].append(event.token_id)
    assert len(first) == 24 and both[0] == first  # a row's draws depend on its own seed alone


# The parts ----------------------------------------------------------------------------------------------------------
def test_prompt_lookup_follows_the_latest_longest_match():
    lookup = PromptLookup([[1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3]])
    assert lookup.propose(0, 3) == [5, 6, 7]  # "2 3" last occurred before 5
    lookup.extend(0, [5])
    assert lookup.propose(0, 2) == [6, 7]  # "2 3 5" occurred once
    assert lookup.propose(0, 0) == []
    lookup.extend(0, [8])
    assert lookup.propose(0, 4) == []  # 8 never occurred before
    short = PromptLookup([[4, 4]])
    assert short.propose(0, 5) == [4]  # the continuation ends where the tokens do


def test_greedy_acceptance_stops_at_the_first_difference():
    targets = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    drafted = torch.tensor([[5, 6, 7], [5, 0, 7], [5, 6, 7]])
    assert accept_greedy(targets, drafted, torch.tensor([3, 3, 1])).tolist() == [3, 1, 1]


def test_sampled_acceptance_keeps_what_the_model_would_draw():
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 8, generator=generator), dim=-1)
    drafted = torch.tensor([[1, 2], [3, 4]])
    tokens, accepted = accept_sampled(probs, drafted, torch.tensor([2, 2]), probs[:, :2], generator)
    assert accepted.tolist() == [2, 2]  # q == p: always accepted, then one more token from the last p
    impossible = probs.clone()
    impossible[:, 0, 1] = impossible[:, 0, 3] = 0.0
    tokens, accepted = accept_sampled(impossible, drafted, torch.tensor([2, 2]), None, generator)
    assert accepted.tolist() == [0, 0] and tokens[0, 0] != 1 and tokens[1, 0] != 3  # never the token p gives 0


def test_the_planner_stops_proposing_when_it_stops_paying_and_tries_again_later():
    costs = StepCosts(slope=0.05)
    planner = Planner(rows=1, most=8, costs=costs, uses_draft=False)
    assert planner.plan([8]) > 0
    for _ in range(6):
        planner.record(0, 4, 0)
    assert planner.plan([8]) == 0  # nothing accepted lately
    waited = 1
    while planner.plan([8]) == 0:
        waited += 1
    assert waited == Planner.FIRST_BACKOFF  # then a probe of a few tokens
    planner.record(0, 2, 0)
    waited = 0
    while planner.plan([8]) == 0:
        waited += 1
    assert waited == 2 * Planner.FIRST_BACKOFF  # a failed probe doubles the wait
    for _ in range(10):
        planner.record(0, 8, 8)
    assert planner.plan([8]) == 8  # everything accepted: propose all
    assert planner.plan([0]) == 0  # nothing to propose
    expensive = Planner(rows=1, most=8, costs=StepCosts(slope=2.0), uses_draft=False)
    assert expensive.plan([8]) == 0  # a wider pass costing 3x one token's never pays at the prior rate
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0


def test_a_draft_half_as_costly_as_the_model_is_tried_from_the_first_step():
    """A draft is chosen for agreeing with the model: its rows start at 0.8, and at half a model step's cost it
    proposes at once; at the even prior prompt lookup starts from, the same costs would not be worth it."""
    costs = StepCosts(slope=0.1, draft_ratio=0.5)
    drafting = Planner(rows=1, most=4, costs=costs, uses_draft=True)
    assert drafting.rate(0) == pytest.approx(0.8)
    assert drafting.plan([4]) > 0
    drafting.rows = [speculative.Acceptance()]  # the even prior
    assert drafting.plan([4]) == 0


def test_measured_costs_replace_the_prior():
    costs = StepCosts(slope=0.1, draft_ratio=0.5)
    assert costs.model_seconds(3) == pytest.approx(1.2)
    costs.observe_model(1, 0.1)
    assert costs.model_seconds(3) == pytest.approx(0.12)
    costs.observe_model(3, 0.3)
    assert costs.model_seconds(3) == pytest.approx(0.3)
    assert costs.draft_seconds(1) == pytest.approx(0.05)
    costs.observe_draft(1, 0.02)
    assert costs.draft_seconds(1) == pytest.approx(0.02)


def test_generation_params_take_one_proposer():
    draft = Draft(torch.nn.Module())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="choose one"):
        GenerationParams(lookup=3, draft=draft)
    with pytest.raises(ValueError, match="lookup"):
        GenerationParams(lookup=-1)
    with pytest.raises(ValueError, match="at least 1"):
        Draft(torch.nn.Module(), tokens=0)  # type: ignore[arg-type]


# CLI ----------------------------------------------------------------------------------------------------------------
PROMPT_TEXT = "def area(width, height):\n    return width * height\n\n\ndef area("


@pytest.mark.parametrize("flags", [["--lookup", "4"], ["--draft", "int8"], ["--draft", "int4", "--draft-tokens", "2"]])
def test_cli_output_is_unchanged_and_the_counts_are_reported(lm_checkpoint, flags):
    runner = CliRunner()
    # --device cpu: int8 and int4 drafts are CPU formats, and a machine with a GPU would default to it
    base = ["generate", PROMPT_TEXT, "-m", str(lm_checkpoint), "--greedy", "--max-new-tokens", "24", "--device", "cpu"]
    base.append("--json")
    plain = runner.invoke(app, base)
    fast = runner.invoke(app, [*base, *flags])
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.output
    plain_record, fast_record = json.loads(plain.stdout), json.loads(fast.stdout)
    assert fast_record["tokens"] == plain_record["tokens"]
    assert fast_record["completion"] == plain_record["completion"]
    report = fast_record["speculation"]
    assert set(report) == {"method", "proposed", "accepted", "acceptance_rate", "passes"}
    assert 0 <= report["accepted"] <= report["proposed"]
    assert "speculation" not in plain_record
    stats = runner.invoke(app, [*base[:-1], *flags, "--stats"])
    assert stats.exit_code == 0
    assert "speculation (" in stats.stderr and "proposed" in stats.stderr


def test_cli_draft_checkpoint_with_the_same_tokenizer(lm_checkpoint, tmp_path):
    from conftest import hf_model

    draft = tmp_path / "draft"
    hf_model(vocab_size=50304, hidden_size=32, seed=9).save_pretrained(draft)
    for item in lm_checkpoint.iterdir():
        if item.name.startswith(("tokenizer", "vocab", "merges", "special")):
            shutil.copyfile(item, draft / item.name)
    runner = CliRunner()
    base = ["generate", PROMPT_TEXT, "-m", str(lm_checkpoint), "--greedy", "--max-new-tokens", "16", "--json"]
    plain = json.loads(runner.invoke(app, base).stdout)
    fast = runner.invoke(app, [*base, "--draft", str(draft)])
    assert fast.exit_code == 0, fast.output
    assert json.loads(fast.stdout)["tokens"] == plain["tokens"]


def test_cli_refuses_two_proposers_and_another_tokenizer(lm_checkpoint, tmp_path):
    runner = CliRunner()
    base = ["generate", "x = 1", "-m", str(lm_checkpoint), "--max-new-tokens", "2"]
    both = runner.invoke(app, [*base, "--lookup", "3", "--draft", "int8"])
    assert both.exit_code == 2 and "choose one" in both.output
    other = tmp_path / "other"
    shutil.copytree(lm_checkpoint, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    added = dict(spec["added_tokens"][-1])
    spec["added_tokens"].append({**added, "id": added["id"] + 1, "content": "<|another|>"})
    (other / "tokenizer.json").write_text(json.dumps(spec))
    refused = runner.invoke(app, [*base, "--draft", str(other)])
    assert refused.exit_code != 0 and "another tokenizer" in refused.output


def test_speculation_module_is_documented_in_the_layer_map():
    assert "speculative" in phi_core.__doc__
    assert speculative.__doc__


@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_a_quantized_draft_off_the_cpu_is_refused_naming_the_draft(spec):
    """int8/int4 are CPU formats: on a GPU the error names --draft (not --dtype) and what to draft with there."""
    from phi_core.errors import PhiError

    with pytest.raises(PhiError, match=f"--draft {spec} is a quantized copy for the CPU.*smaller checkpoint"):
        speculative.load_draft(spec, "tiny", phi_core.load_tokenizer("tiny"), device="cuda")
