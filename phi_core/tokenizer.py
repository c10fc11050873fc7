"""The CodeGen byte-level BPE tokenizer that every Phi checkpoint uses, run by the ``tokenizers`` library.

Read from ``tokenizer.json`` when there is one, else rebuilt from ``vocab.json`` + ``merges.txt`` +
``added_tokens.json``. Decoding is lossless: no "clean-up" of spaces before punctuation, which corrupts code.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from phi_core.checkpoint import checkpoint_file, has_file, read_checkpoint_text
from phi_core.errors import CheckpointError
from phi_core.files import TEXT_LIMIT, first_line

ENDOFTEXT = "<|endoftext|>"


class PhiTokenizer:
    """Text to token ids and back. ``decode(encode(s)) == s`` for every string ``s``."""

    def __init__(self, backend: Tokenizer, name: str = "") -> None:
        self.backend = backend
        self.name = name
        eos = backend.token_to_id(ENDOFTEXT)
        if eos is None:
            raise CheckpointError(f"{name or 'tokenizer'}: has no {ENDOFTEXT} token")
        self.eos_token_id: int = eos
        self._added_ids = frozenset(backend.get_added_tokens_decoder())

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; ``<|endoftext|>`` inside the text becomes its special id."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; bytes of an unfinished UTF-8 character come out as U+FFFD."""
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The raw bytes of ``ids``, so a caller can stream text without splitting a UTF-8 character.

        An id the tokenizer does not have decodes to nothing, as in :meth:`decode` and transformers: every released
        Phi has more embedding rows (51,200) than tokenizer ids (about 50,295), so a model can pick one.
        """
        vocab_bytes = _byte_decoder()
        out = bytearray()
        for token_id in ids:
            token = self.backend.id_to_token(token_id)
            if token is None:
                continue
            if token_id in self._added_ids:
                out += token.encode("utf-8")
            else:
                out += bytes(vocab_bytes[ch] for ch in token)
        return bytes(out)


def tokenizer_from_folder(folder: Path) -> PhiTokenizer:
    """Load the tokenizer files of a checkpoint folder (each must be a regular file inside the checkpoint: see
    :func:`phi_core.checkpoint.checkpoint_file`)."""
    if has_file(folder, "tokenizer.json"):
        text = read_checkpoint_text(folder, "tokenizer.json")
        try:
            backend = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises plain Exception subclasses for malformed files
            raise CheckpointError(f"{folder / 'tokenizer.json'}: cannot be read ({first_line(exc)})") from None
        return PhiTokenizer(backend, str(folder))
    if has_file(folder, "vocab.json") and has_file(folder, "merges.txt"):
        return PhiTokenizer(_tokenizer_from_vocab(folder), str(folder))
    raise CheckpointError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")


def _tokenizer_from_vocab(folder: Path) -> Tokenizer:
    """Rebuild the fast tokenizer from the slow CodeGen files, as transformers does."""
    vocab, merges = (checkpoint_file(folder, name, TEXT_LIMIT) for name in ("vocab.json", "merges.txt"))
    try:
        bpe = models.BPE.from_file(str(vocab), str(merges))
    except Exception as exc:
        raise CheckpointError(f"{folder}: vocab.json/merges.txt cannot be read ({first_line(exc)})") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    added_path = folder / "added_tokens.json"
    added: dict[str, int] = {}
    if has_file(folder, "added_tokens.json"):
        try:
            added = json.loads(read_checkpoint_text(folder, "added_tokens.json"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{added_path}: not valid JSON ({exc})") from None
        if not isinstance(added, dict) or not all(isinstance(v, int) for v in added.values()):
            raise CheckpointError(f"{added_path}: expected an object of token -> id")
    # Added tokens must be registered in id order, since tokenizers assigns the next free id to each.
    for content, token_id in sorted(added.items(), key=lambda item: item[1]):
        if tokenizer.token_to_id(content) == token_id:
            continue
        if token_id != tokenizer.get_vocab_size(with_added_tokens=True):
            raise CheckpointError(f"{added_path}: token {content!r} has id {token_id}, which leaves a gap")
        tokenizer.add_tokens([AddedToken(content, normalized=True, special=False)])
    tokenizer.add_special_tokens([AddedToken(ENDOFTEXT, normalized=False, special=True)])
    return tokenizer


_BYTE_DECODER: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters of byte-level BPE back to byte values."""
    if not _BYTE_DECODER:
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        stand_ins = list(printable)
        extra = 0
        for byte in range(256):
            if byte not in printable:
                printable.append(byte)
                stand_ins.append(256 + extra)
                extra += 1
        _BYTE_DECODER.update({chr(c): b for b, c in zip(printable, stand_ins, strict=True)})
    return _BYTE_DECODER
