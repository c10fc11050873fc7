"""The JSON record each batch command writes for one input row: the input's fields, then the task's results.

`phi generate`, `phi classify` and `phi tag` print these, one per line, and the Ray replicas of
``phi_core.distributed`` build them with the same functions, so a distributed run writes what the local one prints.
"""

from __future__ import annotations

import json
import re
from typing import Any

from phi_core.classify import Classification
from phi_core.completion import Completion, CompletionSetup
from phi_core.precision import Precision
from phi_core.tagging import TaggedText

# Python reads bytes that are not UTF-8 as lone surrogates (surrogateescape); JSON can spell them too.
SURROGATE = re.compile("[\ud800-\udfff]")


def completion_record(
    record: dict[str, Any], done: Completion, precision: Precision, setup: CompletionSetup
) -> dict[str, Any]:
    """`phi generate --json`: the prompt's completion, its tokens, timing, the weights and the products that ran
    them, the settings it ran with, and with speculative decoding the tokens proposed and accepted."""
    out = {
        **record,
        "prompt": done.prompt,
        "completion": done.completion,
        "tokens": done.tokens,
        "finish_reason": done.finish_reason,
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "prefill_s": round(done.prefill_s, 4),
        "decode_s": round(done.decode_s, 4),
        "tokens_per_s": round(done.tokens_per_s, 2),
        "dtype": precision.weights,
        "kernels": precision.kernels(),
        "format": setup.prompt_format.name,
        "generation": setup.generation.report(),
    }
    if done.speculation is not None:
        stats = done.speculation
        out["speculation"] = {
            "method": setup.speculation,
            "proposed": stats.proposed,
            "accepted": stats.accepted,
            "acceptance_rate": round(stats.acceptance, 4),
            "passes": stats.passes,
        }
    return out


def classification_record(
    record: dict[str, Any], result: Classification, top_k: int = 1, all_scores: bool = False
) -> dict[str, Any]:
    """`phi classify --json`: the best label and its score; the ``top_k`` best (or all) when more are asked for."""
    out = {**record, "label": result.top.label, "score": round(result.top.score, 6)}
    if top_k > 1 or all_scores:
        shown = len(result.scores) if all_scores else top_k
        out["scores"] = [{"label": s.label, "score": round(s.score, 6)} for s in result.scores[:shown]]
    return out


def tag_record(record: dict[str, Any], result: TaggedText) -> dict[str, Any]:
    """`phi tag --json`: the labelled spans, as character offsets into the text."""
    spans = [
        {"start": s.start, "end": s.end, "text": s.text, "label": s.label, "score": round(s.score, 6)}
        for s in result.spans
    ]
    return {**record, "spans": spans}


def json_line(record: dict[str, Any]) -> str:
    """``record`` as one line of JSON (no newline): UTF-8 text as is, but a lone surrogate copied from the input,
    which UTF-8 cannot hold, makes the line ASCII with escapes (``\\ud800`` reads back the same)."""
    line = json.dumps(record, ensure_ascii=False)
    return json.dumps(record) if SURROGATE.search(line) else line


class BadRecord(ValueError):
    """What is wrong with one input row; the caller names the file and the line."""


def is_blank(raw: bytes, first: bool = False) -> bool:
    """Whether a JSONL line holds nothing but whitespace (such lines are no records)."""
    try:
        return not raw.decode("utf-8-sig" if first else "utf-8").strip()
    except UnicodeDecodeError:
        return False


def parse_record(raw: bytes, field: str, first: bool = False) -> dict[str, Any]:
    """The object on one non-blank JSONL line, which must be valid UTF-8 (a byte order mark may open the first
    line) and hold a string ``field``; BadRecord says what is wrong."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        byte = raw[exc.start]
        raise BadRecord(f"not valid UTF-8 (byte 0x{byte:02x} at byte {exc.start + 1} of the line)") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRecord(f"invalid JSON ({exc.msg})") from None
    return check_record(record, field)


def check_record(record: Any, field: str) -> dict[str, Any]:
    """``record`` if it is an object with a string ``field`` that is text (no lone surrogate)."""
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise BadRecord(f"expected an object with a string {field!r}")
    if SURROGATE.search(record[field]):
        raise BadRecord(f"{field!r} holds a lone surrogate (\\ud800-\\udfff), not text")
    return record
