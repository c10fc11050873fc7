"""The shape of phi_core: no import cycle between its modules (lazy imports inside functions count too), and the
inference form is one explicit step that a saved checkpoint never carries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import phi_core
from phi_core.errors import PhiError
from phi_core.saving import save_model
from phi_core.tasks import TASKS, head_of, task_of

PACKAGE = Path(phi_core.__file__).parent


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The phi_core modules a source file imports, wherever in the file the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("phi_core.")} & modules
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    return {name: imports_of(PACKAGE / f"{name}.py", modules) for name in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_phi_core_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_task_has_one_row_and_its_head_is_recognised():
    assert set(TASKS) == {"causal-lm", "sequence-classification", "token-classification"}
    keys = {"causal-lm": {"lm_head.weight"}, "sequence-classification": {"score.weight"}}
    keys["token-classification"] = {"score.weight", "score.bias"}
    for name, task in TASKS.items():
        assert head_of(keys[name]) == name
        with torch.device("meta"):
            assert task_of(task.model_class(phi_core.PhiConfig(num_hidden_layers=1))) is task


@pytest.mark.parametrize("variant", [{}, {"qk_layernorm": True}, {"num_attention_heads": 8, "num_key_value_heads": 2}])
def test_the_inference_form_computes_what_the_checkpoint_form_does(make_checkpoint, variant):
    _, folder = make_checkpoint(**variant)
    prepared = phi_core.load_model(folder, dtype="float32")
    plain = phi_core.load_model(folder, dtype="float32", prepare=False)
    assert prepared.is_prepared and not plain.is_prepared
    ids = torch.randint(0, 320, (2, 9))
    assert (prepared(ids).logits - plain(ids).logits).abs().max() <= 1e-5


def test_saving_refuses_the_inference_form_and_round_trips_the_checkpoint_form(make_checkpoint, tmp_path):
    _, folder = make_checkpoint(task="token-classification", num_labels=3)
    with pytest.raises(PhiError, match="inference form"):
        save_model(phi_core.load_model(folder, task="token-classification"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    plain = phi_core.load_model(folder, task="token-classification", prepare=False)
    save_model(plain, tmp_path / "out")
    again = phi_core.load_model(tmp_path / "out", task="token-classification", dtype="float32")
    ids = torch.randint(0, 320, (1, 7))
    assert (again(ids).logits - plain(ids).logits).abs().max() <= 1e-6


def test_packed_dtypes_exist_only_in_the_inference_form(make_checkpoint):
    _, folder = make_checkpoint()
    with pytest.raises(ValueError, match="inference form"):
        phi_core.load_model(folder, dtype="int8", prepare=False)
