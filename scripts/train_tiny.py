"""Train the embedded tiny Phi on the Python standard library of the running interpreter.

    python scripts/train_tiny.py lm --steps 3000 --out phi_core/assets/tiny
    python scripts/train_tiny.py heads --base phi_core/assets/tiny --out-dir phi_core/assets
    python scripts/train_tiny.py lm --hidden-size 256 --steps 400 --out /tmp/wide256   # for benchmarks/quality.py

``lm`` trains a Phi-architecture causal LM with phi_core's own model code and the real Phi-1.5 tokenizer.
The data is every ``.py`` file of the standard library (test packages excluded), in sorted path order; a fixed
1-in-20 share of the files, chosen by a hash of their path, is held out. During training the softmax runs over
only the token ids that occur in the training files (a 2.3x cheaper output layer); the saved checkpoint is a
normal full-vocabulary Phi whose never-seen tokens get a bias of -20, so they are (almost) never predicted.

``heads`` fits two classification heads on the frozen LM (so their folders reuse the LM's weight file through
``model.safetensors.index.json`` and add only the head): a token tagger whose labels come from Python's own
``tokenize`` module, and a sequence classifier telling code from prose (docstrings).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import keyword
import math
import random
import sys
import sysconfig
import time
import tokenize
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi_core.config import PhiConfig  # noqa: E402
from phi_core.embedded import TINY_CONFIG  # noqa: E402
from phi_core.loading import load_model  # noqa: E402
from phi_core.model import PhiForCausalLM  # noqa: E402
from phi_core.saving import atomic_folder, copy_tokenizer, save_model, write_config  # noqa: E402
from phi_core.tokenizer import PhiTokenizer, tokenizer_from_folder  # noqa: E402

# The real Phi-1.5 tokenizer: from ../shared in a development checkout, else the copy in the shipped model.
TOKENIZER_DIR = next(
    (
        d
        for d in (ROOT.parent / "shared" / "phi-1_5-tokenizer", ROOT / "phi_core" / "assets" / "tiny")
        if (d / "tokenizer.json").is_file()
    ),
    ROOT.parent / "shared" / "phi-1_5-tokenizer",
)
SEED = 1234
# tokenizer.json alone carries the whole tokenizer; the slow-tokenizer files would add 1.3 MB per model.
SHIPPED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
NEVER_SEEN_BIAS = -20.0
TAGS = ("O", "KEYWORD", "NAME", "STRING", "NUMBER", "COMMENT", "OP")
KINDS = ("code", "prose")


# Data ------------------------------------------------------------------------------------------------------
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(limit: int | None = None) -> list[Path]:
    """The standard library's .py files outside test packages and site-packages, sorted by path."""
    skip = ("site-packages", "test", "tests", "idlelib")
    files = sorted(p for p in STDLIB.rglob("*.py") if not any(part in skip for part in p.relative_to(STDLIB).parts))
    return files[:limit] if limit else files


def is_held_out(path: Path) -> bool:
    """A fixed 1-in-20 share of files, chosen by a hash of the path inside the stdlib (not by file order)."""
    relative = path.relative_to(STDLIB).as_posix()
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % 20 == 0


def read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def token_stream(tokenizer: PhiTokenizer, files: list[Path]) -> torch.Tensor:
    """All files' token ids, each file followed by <|endoftext|>, as one long tensor."""
    ids: list[int] = []
    for encoded in tokenizer.encode_batch([read_source(p) for p in files]):
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def split_files(limit: int | None) -> tuple[list[Path], list[Path]]:
    files = stdlib_files(limit)
    held = [p for p in files if is_held_out(p)]
    train = [p for p in files if not is_held_out(p)]
    if len(held) < 3:  # small smoke runs may hash (almost) no file out: hold out the last few
        held, train = held + train[-3:], train[:-3]
    return train, held


# Language model ------------------------------------------------------------------------------------------
@dataclass
class LMSettings:
    steps: int
    batch: int
    seq_len: int
    lr: float
    warmup: int
    limit_files: int | None
    eval_batches: int


def lm_loss(model: PhiForCausalLM, ids: torch.Tensor, active: torch.Tensor, remap: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy with the softmax restricted to the ``active`` token ids."""
    hidden = model.model(ids[:, :-1])
    weight = model.lm_head.weight[active]
    logits = hidden @ weight.T + model.lm_head.bias[active]
    targets = remap[ids[:, 1:]]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def full_vocab_loss(model: PhiForCausalLM, stream: torch.Tensor, seq_len: int, batches: int) -> float:
    """Mean next-token loss over the full vocabulary on consecutive windows of ``stream``."""
    windows = stream[: (len(stream) // (seq_len + 1)) * (seq_len + 1)].view(-1, seq_len + 1)
    windows = windows[: batches * 8]
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(8):
            logits = model(chunk[:, :-1]).logits
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += chunk[:, 1:].numel()
    return total / max(count, 1)


def lm_config(hidden_size: int | None) -> PhiConfig:
    """The embedded model's config, or one as deep but ``hidden_size`` wide (heads of 32, MLP 4x): a model whose
    matrices are long enough for int4's real group sizes, to measure quantization quality on."""
    if hidden_size is None:
        return TINY_CONFIG
    heads = hidden_size // 32
    return replace(
        TINY_CONFIG,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )


def train_lm(args: argparse.Namespace) -> dict[str, float]:
    settings = LMSettings(
        args.steps, args.batch, args.seq_len, args.lr, args.warmup, args.limit_files, args.eval_batches
    )
    torch.manual_seed(SEED)
    tokenizer = tokenizer_from_folder(TOKENIZER_DIR)
    train_files, held_files = split_files(settings.limit_files)
    train, held = token_stream(tokenizer, train_files), token_stream(tokenizer, held_files)
    print(
        f"data: {len(train_files)} train files ({len(train):,} tokens), "
        f"{len(held_files)} held-out files ({len(held):,} tokens)",
        flush=True,
    )
    active = torch.unique(train)
    config = lm_config(args.hidden_size)
    remap = torch.zeros(config.vocab_size, dtype=torch.long)
    remap[active] = torch.arange(len(active))
    model = PhiForCausalLM(config)
    init_weights(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(SEED)
    start, tokens_seen = time.time(), 0
    for step in range(1, settings.steps + 1):
        lr = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, len(train) - settings.seq_len - 1, (settings.batch,), generator=generator)
        batch = torch.stack([train[o : o + settings.seq_len + 1] for o in offsets.tolist()])
        loss = lm_loss(model, batch, active, remap)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens_seen += batch[:, 1:].numel()
        if step % 50 == 0 or step == settings.steps:
            elapsed = time.time() - start
            print(
                f"step {step}/{settings.steps} loss {loss.item():.3f} lr {lr:.2e} "
                f"{tokens_seen / elapsed:,.0f} tok/s {elapsed / 60:.1f} min",
                flush=True,
            )
    model.eval()
    with torch.no_grad():
        unseen = torch.ones(config.vocab_size, dtype=torch.bool)
        unseen[active] = False
        model.lm_head.bias[unseen] = NEVER_SEEN_BIAS
    held_loss = full_vocab_loss(model, held, settings.seq_len, settings.eval_batches)
    metrics = {
        "held_out_loss": round(held_loss, 4),
        "held_out_perplexity": round(math.exp(held_loss), 2),
        "train_tokens_seen": tokens_seen,
        "train_tokens_available": len(train),
        "held_out_tokens": len(held),
        "active_vocab": len(active),
        "steps": settings.steps,
        "minutes": round((time.time() - start) / 60, 1),
        "python": sys.version.split()[0],
    }
    print(json.dumps(metrics), flush=True)
    save_model(
        model,
        Path(args.out),
        dtype=torch.float16,
        tokenizer_dir=TOKENIZER_DIR,
        force=True,
        tokenizer_files=SHIPPED_TOKENIZER_FILES,
    )
    (Path(args.out) / "training.json").write_text(
        json.dumps({"settings": vars(args), **metrics}, indent=2, default=str) + "\n"
    )
    return metrics


def init_weights(model: torch.nn.Module) -> None:
    """GPT-2 style: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    for name, param in model.named_parameters():
        if "layernorm" in name:
            torch.nn.init.ones_(param) if name.endswith("weight") else torch.nn.init.zeros_(param)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(param)
        else:
            torch.nn.init.normal_(param, std=0.02)


def learning_rate(step: int, settings: LMSettings) -> float:
    if step <= settings.warmup:
        return settings.lr * step / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# Heads -----------------------------------------------------------------------------------------------------
def python_tags(source: str) -> list[tuple[int, int, str]]:
    """(start, end, tag) character spans of the Python tokens of ``source``, from the ``tokenize`` module."""
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    spans = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            tag = _tag_of(token)
            if tag is None:
                continue
            start = line_starts[token.start[0] - 1] + token.start[1]
            end = line_starts[token.end[0] - 1] + token.end[1]
            spans.append((start, end, tag))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return spans


def _tag_of(token: tokenize.TokenInfo) -> str | None:
    kind = token.type
    if kind == tokenize.NAME:
        return "KEYWORD" if keyword.iskeyword(token.string) else "NAME"
    names = {tokenize.STRING: "STRING", tokenize.NUMBER: "NUMBER", tokenize.COMMENT: "COMMENT", tokenize.OP: "OP"}
    if kind in names:
        return names[kind]
    if sys.version_info >= (3, 12) and kind in (tokenize.FSTRING_START, tokenize.FSTRING_MIDDLE, tokenize.FSTRING_END):
        return "STRING"
    return None


def tag_tokens(tokenizer: PhiTokenizer, source: str) -> tuple[list[int], list[int]]:
    """Token ids of ``source`` and a label per token: the tag of the Python token that starts at the BPE token's
    first non-space character, ``O`` for whitespace, -100 (ignored) for tokens that continue a Python token."""
    encoding = tokenizer.backend.encode(source, add_special_tokens=False)
    starts = {start: tag for start, _, tag in python_tags(source)}
    covered = set()
    for start, end, _ in python_tags(source):
        covered.update(range(start, end))
    labels = []
    for begin, end in encoding.offsets:
        text = source[begin:end]
        first = begin + (len(text) - len(text.lstrip()))
        if first >= end:
            labels.append(TAGS.index("O"))
        elif first in starts:
            labels.append(TAGS.index(starts[first]))
        elif first in covered:
            labels.append(-100)
        else:
            labels.append(TAGS.index("O"))
    return encoding.ids, labels


def code_and_prose(path: Path) -> list[tuple[str, int]]:
    """Snippets of one file labelled code (a few lines of statements) or prose (a docstring's text)."""
    import ast

    source = read_source(path)
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    snippets = []
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                snippets.append((doc[:300], KINDS.index("prose")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
            body = [ln for ln in lines[node.body[-1].lineno - 1 : node.end_lineno] if ln.strip()]
            code = "\n".join(body[:6])
            if len(code) > 40:
                snippets.append((code[:300], KINDS.index("code")))
    return snippets


def features(model: PhiForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.model(torch.tensor([ids]))[0]


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int = 300) -> torch.nn.Linear:
    """A softmax-regression head (full-batch AdamW), seeded."""
    torch.manual_seed(SEED)
    head = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(epochs):
        loss = F.cross_entropy(head(x), y, ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    keep = y != -100
    with torch.no_grad():
        return (head(x[keep]).argmax(-1) == y[keep]).float().mean().item()


def train_heads(args: argparse.Namespace) -> dict[str, float]:
    base_dir = Path(args.base)
    model = load_model(base_dir)
    tokenizer = tokenizer_from_folder(base_dir)
    train_files, held_files = split_files(args.limit_files)
    rng = random.Random(SEED)
    train_files = rng.sample(train_files, min(args.head_files, len(train_files)))
    held_files = held_files[: max(3, args.head_files // 10)]

    def tagged(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for path in files:
            source = read_source(path)[: args.chars_per_file]
            ids, labels = tag_tokens(tokenizer, source)
            if ids:
                xs.append(features(model, ids))
                ys.append(torch.tensor(labels))
        return torch.cat(xs), torch.cat(ys)

    def snippets(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for path in files:
            for text, label in code_and_prose(path)[: args.snippets_per_file]:
                xs.append(features(model, tokenizer.encode(text))[-1])
                ys.append(label)
        if not xs:
            raise SystemExit(f"no code/prose snippets in {len(files)} files: use more files")
        return torch.stack(xs), torch.tensor(ys)

    x_tag, y_tag = tagged(train_files)
    tagger = fit_linear(x_tag, y_tag, len(TAGS))
    x_tag_held, y_tag_held = tagged(held_files)
    x_cls, y_cls = snippets(train_files)
    classifier = fit_linear(x_cls, y_cls, len(KINDS))
    x_cls_held, y_cls_held = snippets(held_files)
    metrics = {
        "tagger_held_out_accuracy": round(accuracy(tagger, x_tag_held, y_tag_held), 4),
        "tagger_train_tokens": int((y_tag != -100).sum()),
        "tagger_held_out_tokens": int((y_tag_held != -100).sum()),
        "classifier_held_out_accuracy": round(accuracy(classifier, x_cls_held, y_cls_held), 4),
        "classifier_train_snippets": len(y_cls),
        "classifier_held_out_snippets": len(y_cls_held),
    }
    print(json.dumps(metrics), flush=True)
    out_dir = Path(args.out_dir)
    save_head(
        out_dir / "tiny-tagger",
        base_dir,
        model.config.with_labels(list(TAGS)),
        tagger,
        "token-classification",
        bias=True,
    )
    save_head(
        out_dir / "tiny-classifier",
        base_dir,
        model.config.with_labels(list(KINDS), "single_label_classification"),
        classifier,
        "sequence-classification",
        bias=False,
    )
    (out_dir / "tiny-tagger" / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def save_head(folder: Path, base_dir: Path, config: PhiConfig, head: torch.nn.Linear, task: str, bias: bool) -> None:
    """A head checkpoint that reuses the base's weight file: an index maps ``model.*`` to ``../BASE/``."""
    from safetensors import safe_open

    with atomic_folder(folder, force=True) as staging:
        write_config(staging, config, task)
        tensors = {"score.weight": head.weight.detach().half().contiguous()}
        if bias:
            tensors["score.bias"] = head.bias.detach().half().contiguous()
        save_file(tensors, str(staging / "score.safetensors"), metadata={"format": "pt"})
        base_file = f"../{base_dir.name}/model.safetensors"
        with safe_open(str(base_dir / "model.safetensors"), framework="pt") as handle:
            weight_map = {key: base_file for key in handle.keys() if key.startswith("model.")}  # noqa: SIM118
        weight_map.update({key: "score.safetensors" for key in tensors})
        index = {
            "metadata": {"note": "model.* weights are shared with the base model folder"},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        copy_tokenizer(base_dir, staging)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    lm = sub.add_parser("lm", help="train the causal LM")
    lm.add_argument("--steps", type=int, default=1300)
    lm.add_argument("--batch", type=int, default=16)
    lm.add_argument("--seq-len", type=int, default=256)
    lm.add_argument("--lr", type=float, default=3e-3)
    lm.add_argument("--warmup", type=int, default=100)
    lm.add_argument("--limit-files", type=int, default=None, help="use only the first N files (smoke tests)")
    lm.add_argument("--eval-batches", type=int, default=40)
    lm.add_argument("--threads", type=int, default=2)
    lm.add_argument("--out", default=str(ROOT / "phi_core" / "assets" / "tiny"))
    lm.add_argument("--hidden-size", type=int, default=None, help="a wider model than the embedded one (x32)")
    heads = sub.add_parser("heads", help="fit the tagger and classifier heads on a trained LM")
    heads.add_argument("--base", default=str(ROOT / "phi_core" / "assets" / "tiny"))
    heads.add_argument("--out-dir", default=str(ROOT / "phi_core" / "assets"))
    heads.add_argument("--head-files", type=int, default=300)
    heads.add_argument("--chars-per-file", type=int, default=4000)
    heads.add_argument("--snippets-per-file", type=int, default=8)
    heads.add_argument("--limit-files", type=int, default=None)
    heads.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "lm":
        train_lm(args)
    else:
        train_heads(args)


if __name__ == "__main__":
    main()
