"""Token ids equal transformers' CodeGen tokenizer on real Python files and hard strings; decode is lossless."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

import phi_core
from phi_core.tokenizer import tokenizer_from_folder

HARD_STRINGS = [
    "",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "héllo wörld — ça va? 日本語のテキスト",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷",
    "    four spaces\n        eight\n" + " " * 40 + "forty\n",
    "\ttab\n\t\ttwo tabs\n\t\t\t\t\t\t\t\t\t\t\tmany tabs \t mixed \t\n",
    "trailing spaces   \n\n\n\nblank lines\r\nwindows line\r\n",
    "before<|endoftext|>after <|endoftext|> <|endoftext|><|endoftext|>",
    "x = 'quote' + \"double\" ; y = f'{x!r:>10}'  # comment ,.;:!?",
    "word , word . word ? ( parens ) [ brackets ] don 't",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "\x00\x01 control \x7f chars",
]


def python_corpus(count: int = 25) -> list[str]:
    """Real Python files from the running interpreter's standard library (a fixed, sorted selection)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[::7][:count]
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return phi_core.load_tokenizer(tokenizer_dir)


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_hard_strings_match_transformers(ours, reference, text):
    assert ours.encode(text) == reference(text, add_special_tokens=False)["input_ids"]


def test_python_files_match_transformers_and_round_trip(ours, reference):
    for source in python_corpus():
        ids = ours.encode(source)
        assert ids == reference(source, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == source


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_decode_is_lossless(ours, text):
    assert ours.decode(ours.encode(text)) == text
    assert ours.decode_bytes(ours.encode(text)) == text.encode("utf-8")


def test_whitespace_runs_and_endoftext_ids(ours):
    assert ours.eos_token_id == 50256
    assert ours.encode("<|endoftext|>") == [50256]
    assert len(ours) == 50295
    assert ours.encode("    ") == [50284]  # runs of spaces are single added tokens
    assert ours.encode("\t\t") == [50294]


def test_no_cleanup_of_spaces_before_punctuation(ours):
    text = "a , b . c ! d ? e 's f n't"
    assert ours.decode(ours.encode(text)) == text


def test_vocab_and_merges_fallback_gives_same_ids(ours, tokenizer_dir, tmp_path):
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        shutil.copyfile(tokenizer_dir / name, tmp_path / name)
    fallback = tokenizer_from_folder(tmp_path)
    for text in [*HARD_STRINGS, *python_corpus(5)]:
        assert fallback.encode(text) == ours.encode(text)
        assert fallback.decode(fallback.encode(text)) == text
    assert len(fallback) == len(ours)


def test_missing_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(phi_core.CheckpointError, match="no tokenizer.json"):
        phi_core.load_tokenizer(tmp_path)
