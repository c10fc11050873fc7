"""The tasks a Phi checkpoint can serve, one row each: the model class, the head it needs, the architecture name
transformers writes for it, and the embedded model a command runs when no ``--model`` is given.

A new head is one new row here (and its class in ``model.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from phi_core.errors import PhiError
from phi_core.model import PhiForCausalLM, PhiForSequenceClassification, PhiForTokenClassification, PhiPreTrained


@dataclass(frozen=True)
class Task:
    """One task: what serves it and how a checkpoint shows that it carries its head."""

    name: str
    model_class: type[PhiPreTrained]
    architecture: str  # transformers' class name, written into config.json
    head: str  # what the head is, for error messages
    head_keys: str  # the tensors that make it, for error messages
    embedded_default: str  # the embedded model commands use without --model


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("causal-lm", PhiForCausalLM, "PhiForCausalLM", "a causal-LM head", "lm_head.weight", "tiny"),
        Task(
            "sequence-classification",
            PhiForSequenceClassification,
            "PhiForSequenceClassification",
            "a sequence-classification head",
            "score.weight without bias",
            "tiny-classifier",
        ),
        Task(
            "token-classification",
            PhiForTokenClassification,
            "PhiForTokenClassification",
            "a token-classification head",
            "score.weight and score.bias",
            "tiny-tagger",
        ),
    )
}


def task_named(name: str) -> Task:
    """The task called ``name``; an unknown name is a ValueError listing the tasks."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (choose one of {', '.join(TASKS)})")
    return TASKS[name]


def task_of(model: PhiPreTrained) -> Task:
    """The task a model instance serves."""
    for task in TASKS.values():
        if type(model) is task.model_class:
            return task
    raise PhiError(f"{type(model).__name__} serves no known task")


def head_of(keys: Iterable[str]) -> str | None:
    """Which task's head a set of (current-layout) tensor names carries, if any."""
    keys = set(keys)
    if "lm_head.bias" in keys or "lm_head.weight" in keys:
        return "causal-lm"
    if "score.weight" in keys:
        return "token-classification" if "score.bias" in keys else "sequence-classification"
    return None
