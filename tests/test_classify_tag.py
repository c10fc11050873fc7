"""Sequence and token classification: batched equals alone, exact offsets, every aggregation by hand."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import checkpoint_with_tokenizer
from typer.testing import CliRunner

import phi_core
from phi_cli.main import app
from phi_core.classify import classify
from phi_core.tagging import Span, _Token, aggregate_tokens, tag, word_spans

TEXTS = ["def f(x): return x", "Return the sum.", "🙂 héllo\t\twörld    x", "a"]


@pytest.mark.parametrize("pad_token_id", [None, 0, 50256])
def test_batched_classification_equals_each_text_alone(tmp_path, pad_token_id):
    folder = checkpoint_with_tokenizer(
        tmp_path / "c", "sequence-classification", num_labels=3, pad_token_id=pad_token_id
    )
    model, tokenizer = phi_core.load_model(folder, "sequence-classification"), phi_core.load_tokenizer(folder)
    batched = list(classify(model, tokenizer, TEXTS, batch_size=4))
    for text, result in zip(TEXTS, batched, strict=True):
        (alone,) = classify(model, tokenizer, [text])
        assert [s.label for s in alone.scores] == [s.label for s in result.scores]
        assert [s.score for s in alone.scores] == pytest.approx([s.score for s in result.scores], abs=1e-5)
        assert sum(s.score for s in result.scores) == pytest.approx(1.0)


def test_classification_matches_transformers_scores(classifier_checkpoint):
    import transformers

    reference = transformers.PhiForSequenceClassification.from_pretrained(classifier_checkpoint, dtype=torch.float32)
    model = phi_core.load_model(classifier_checkpoint, "sequence-classification")
    tokenizer = phi_core.load_tokenizer(classifier_checkpoint)
    for text, result in zip(TEXTS, classify(model, tokenizer, TEXTS, batch_size=3), strict=True):
        with torch.no_grad():
            expected = torch.softmax(reference(torch.tensor([tokenizer.encode(text)])).logits[0], -1)
        got = {s.label: s.score for s in result.scores}
        for index, label in reference.config.id2label.items():
            assert got[label] == pytest.approx(expected[index].item(), abs=1e-5)


def test_batched_tagging_equals_each_text_alone(tagger_checkpoint):
    model, tokenizer = (
        phi_core.load_model(tagger_checkpoint, "token-classification"),
        phi_core.load_tokenizer(tagger_checkpoint),
    )
    batched = list(tag(model, tokenizer, TEXTS, aggregate="none", ignore_labels=(), batch_size=4))
    for text, result in zip(TEXTS, batched, strict=True):
        (alone,) = tag(model, tokenizer, [text], aggregate="none", ignore_labels=())
        assert [(s.start, s.end, s.label) for s in alone.spans] == [(s.start, s.end, s.label) for s in result.spans]
        assert [s.score for s in alone.spans] == pytest.approx([s.score for s in result.spans], abs=1e-5)


HARD = "def  fib(n):\n\t\treturn n  # 🙂 héllo 👨‍👩‍👧 wörld" + " " * 9 + "end\r\n"


def test_token_offsets_are_exact(tagger_checkpoint):
    model, tokenizer = (
        phi_core.load_model(tagger_checkpoint, "token-classification"),
        phi_core.load_tokenizer(tagger_checkpoint),
    )
    (result,) = tag(model, tokenizer, [HARD], aggregate="none", ignore_labels=())
    assert len(result.spans) == len(tokenizer.encode(HARD))
    for span in result.spans:
        assert span.text == HARD[span.start : span.end]
        assert span.text == span.text.lstrip() or not span.text.strip()  # leading spaces only on blank tokens
    # Characters split over several byte-level tokens give those tokens the same span; together the spans
    # still cover every non-blank character, in order.
    starts = [s.start for s in result.spans]
    assert starts == sorted(starts)
    covered = {i for s in result.spans for i in range(s.start, s.end)}
    assert {i for i, ch in enumerate(HARD) if not ch.isspace()} <= covered


def test_words_are_pre_tokenizer_pieces_without_leading_space(tagger_checkpoint):
    tokenizer = phi_core.load_tokenizer(tagger_checkpoint)
    text = "def  fib(n):  x.y = 'é🙂'"
    words = [text[a:b] for a, b in word_spans(tokenizer, text)]
    assert words == ["def", "fib", "(", "n", "):", "x", ".", "y", "=", "'", "é", "🙂'"]


# Hand-worked aggregation: five tokens over "Hello wor ld !" with chosen probabilities ----------------------
LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "LOC"}
TEXT = "Jo hnny visits Paris now"


def token(start, end, probs, word):
    return _Token(start, end, torch.tensor(probs), word)


# words: "Jo"(0) "hnny"(1) "visits"(2) "Paris"(3) "now"(4); "Paris" is two tokens: "Pa" + "ris".
TOKENS = [
    token(0, 2, [0.1, 0.7, 0.1, 0.1], 0),  # Jo      B-PER 0.7
    token(3, 7, [0.1, 0.1, 0.6, 0.2], 1),  # hnny    I-PER 0.6
    token(8, 14, [0.9, 0.0, 0.0, 0.1], 2),  # visits  O 0.9
    token(15, 17, [0.2, 0.0, 0.0, 0.8], 3),  # Pa      LOC 0.8
    token(17, 20, [0.5, 0.0, 0.0, 0.5 - 1e-3], 3),  # ris O 0.5 (LOC 0.499)
    token(21, 24, [0.3, 0.0, 0.0, 0.7], 4),  # now     LOC 0.7
]


def spans(strategy):
    return [(s.text, s.label, round(s.score, 4)) for s in aggregate_tokens(TEXT, TOKENS, LABELS, strategy)]


def test_aggregate_none():
    assert spans("none") == [
        ("Jo", "B-PER", 0.7),
        ("hnny", "I-PER", 0.6),
        ("visits", "O", 0.9),
        ("Pa", "LOC", 0.8),
        ("ris", "O", 0.5),
        ("now", "LOC", 0.7),
    ]


def test_aggregate_simple_merges_b_i_runs():
    assert spans("simple") == [
        ("Jo hnny", "PER", 0.65),
        ("visits", "O", 0.9),
        ("Pa", "LOC", 0.8),
        ("ris", "O", 0.5),
        ("now", "LOC", 0.7),
    ]


def test_aggregate_first_uses_each_words_first_token():
    # Paris -> LOC 0.8 (from "Pa"); then Paris and now are both LOC and merge: mean(0.8, 0.7).
    assert spans("first") == [("Jo hnny", "PER", 0.65), ("visits", "O", 0.9), ("Paris now", "LOC", 0.75)]


def test_aggregate_average_averages_probabilities():
    # Paris: mean([.2,0,0,.8], [.5,0,0,.499]) = [.35, 0, 0, .6495] -> LOC .6495; merged with now: (.6495+.7)/2.
    assert spans("average") == [("Jo hnny", "PER", 0.65), ("visits", "O", 0.9), ("Paris now", "LOC", 0.6748)]


def test_aggregate_max_takes_the_most_confident_token():
    assert spans("max") == [("Jo hnny", "PER", 0.65), ("visits", "O", 0.9), ("Paris now", "LOC", 0.75)]


def test_group_with_a_new_b_starts_a_new_entity():
    tokens = [token(0, 2, [0, 0.9, 0, 0], 0), token(3, 7, [0, 0.8, 0, 0], 1)]  # B-PER, B-PER
    assert [(s.text, s.label) for s in aggregate_tokens(TEXT, tokens, LABELS, "simple")] == [
        ("Jo", "PER"),
        ("hnny", "PER"),
    ]


def test_span_type():
    assert Span(0, 2, "Jo", "PER", 0.5).text == TEXT[0:2]


# CLI ---------------------------------------------------------------------------------------------------------
def run(args, stdin=None):
    return CliRunner().invoke(app, args, input=stdin)


def test_classify_cli_json_and_options(classifier_checkpoint, tmp_path):
    m = ["-m", str(classifier_checkpoint)]
    result = run(["classify", *m, "--json", "x = 1", "Some prose."])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in records] == ["x = 1", "Some prose."]
    assert all(r["label"] in ("code", "prose", "other") and 0 <= r["score"] <= 1 for r in records)
    assert "scores" not in records[0]
    top2 = json.loads(run(["classify", *m, "--json", "x = 1", "--top-k", "2"]).stdout)
    assert len(top2["scores"]) == 2 and top2["scores"][0]["label"] == top2["label"]
    every = json.loads(run(["classify", *m, "--json", "x = 1", "--all-scores"]).stdout)
    assert len(every["scores"]) == 3
    raw = json.loads(run(["classify", *m, "--json", "x = 1", "--all-scores", "--function", "none"]).stdout)
    assert sum(s["score"] for s in raw["scores"]) != pytest.approx(1.0)
    sig = json.loads(run(["classify", *m, "--json", "x = 1", "--all-scores", "--function", "sigmoid"]).stdout)
    assert all(0 < s["score"] < 1 for s in sig["scores"])
    lines = run(["classify", *m, "--json", "--batch-size", "2"], stdin="one\ntwo\n\nthree\n")
    assert [json.loads(x)["text"] for x in lines.stdout.splitlines()] == ["one", "two", "three"]
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a", "id": 7}\n')
    carried = json.loads(run(["classify", *m, "--json", "--input", str(path)]).stdout)
    assert carried["id"] == 7 and carried["text"] == "a"


def test_tag_cli_json(tagger_checkpoint):
    m = ["-m", str(tagger_checkpoint)]
    result = run(["tag", *m, "--json", HARD, "--aggregate", "none", "--ignore-labels", "NONE"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["text"] == HARD
    for span in record["spans"]:
        assert HARD[span["start"] : span["end"]] == span["text"]
    for strategy in ("simple", "first", "average", "max"):
        out = run(["tag", *m, "--json", HARD, "--aggregate", strategy])
        assert out.exit_code == 0, out.output
        assert all(s["label"] != "O" for s in json.loads(out.stdout)["spans"])


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (["classify", "--top-k", "0", "x"], None, 2, "--top-k"),
        (["classify", "--function", "relu", "x"], None, 2, "--function"),
        (["classify"], "", 2, "stdin holds no text"),
        (["classify", "--input", "-"], "[1]\n", 2, "line 1: expected an object with a string 'text'"),
        (["classify", "x", "--input", "-"], "", 2, "not both"),
        (["classify", "word " * 80], None, 1, "text 1 has 81 tokens; the model's context is 64"),
        (["tag", "--aggregate", "best", "x"], None, 2, "--aggregate"),
        (["tag", "word " * 80], None, 1, "(use --truncate to cut it)"),
        (["classify", "-", "x", "-"], "a\n", 2, "- (stdin) given more than once"),
        (["tag", "-"], "\n\n", 2, "stdin holds no text"),
        (["tag", "--input", "-"], b'{"text": "caf\xe9"}\n', 2, "stdin line 1: not valid UTF-8 (byte 0xe9 at byte 14"),
    ],
)
def test_bad_input(classifier_checkpoint, tagger_checkpoint, args, stdin, code, message):
    folder = classifier_checkpoint if args[0] == "classify" else tagger_checkpoint
    result = run([args[0], "-m", str(folder), *args[1:]], stdin=stdin)
    assert result.exit_code == code, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_dash_stands_for_the_lines_of_stdin(classifier_checkpoint):
    result = run(["classify", "-m", str(classifier_checkpoint), "--json", "first", "-", "last"], stdin="a\n\nb\r\n")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == ["first", "a", "b", "last"]


def test_stdin_lines_that_are_not_utf8_are_replaced_with_a_notice(tagger_checkpoint):
    result = run(["tag", "-m", str(tagger_checkpoint), "--json"], stdin=b"caf\xe9 = 1\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == "caf\ufffd = 1"
    assert result.stderr == "note: stdin is not valid UTF-8; the bytes that are not were replaced by U+FFFD\n"


def test_truncate_cuts_long_texts(classifier_checkpoint):
    result = run(["classify", "-m", str(classifier_checkpoint), "--json", "word " * 80, "--truncate"])
    assert result.exit_code == 0, result.output


def test_wrong_head_says_what_the_checkpoint_has(lm_checkpoint, classifier_checkpoint):
    result = run(["classify", "-m", str(lm_checkpoint), "x"])
    assert result.exit_code == 1
    assert "has a causal-LM head (lm_head.weight), not the sequence-classification head" in result.stderr
    result = run(["tag", "-m", str(classifier_checkpoint), "x"])
    assert "has a sequence-classification head (score.weight without bias)" in result.stderr
