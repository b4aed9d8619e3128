"""The library's layers point one way (README, "How the code is laid out"), function-level imports included.

The graph is built from the source with ``ast`` (every ``import`` / ``from ... import`` anywhere in a
module, relative imports resolved), so an import hidden inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each installed package lives in the repository (pyproject.toml's package-dir)
PACKAGE_DIRS = {"mdlm_kit": ROOT / "mdlm_kit", "mdlm_kit.kernels": ROOT / "kernels", "mdlm_kit.eval": ROOT / "eval"}

# lowest first; a module may import its own layer and the layers below it, never one above
LAYERS = [
    ("core", ["mdlm_kit", "mdlm_kit.errors", "mdlm_kit.specs", "mdlm_kit.rng", "mdlm_kit.schedules",
              "mdlm_kit.objective", "mdlm_kit.families", "mdlm_kit.models", "mdlm_kit.sampling", "mdlm_kit.kernels"]),
    ("support", ["mdlm_kit.utils", "mdlm_kit.lightning_gaps"]),
    ("data", ["mdlm_kit.data"]),
    ("training", ["mdlm_kit.lightning", "mdlm_kit.callbacks"]),
    ("io", ["mdlm_kit.io"]),
    ("entry", ["mdlm_kit.cli", "mdlm_kit.generate", "mdlm_kit.eval"]),
]


def module_files() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The toolkit modules ``name`` imports (anywhere in the file), each resolved to a module of ``modules``."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not (target == "mdlm_kit" and name.startswith("mdlm_kit.")):
                out.add(target)
    return out


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return rank


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_imports_point_down(graph):
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in graph.items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_models_import_only_torch_and_themselves():
    for path in (ROOT / "mdlm_kit" / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                assert n.split(".")[0] in {"torch", "math", "__future__", "dataclasses", "typing"}, (path, n)


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_a_function_level_upward_import(tmp_path):
    """The checker itself: an import inside a function body, relative or absolute, is found."""
    src = tmp_path / "objective.py"
    src.write_text("def f():\n    from mdlm_kit.io.checkpoint import load_checkpoint\n    from .cli import main\n")
    found = imports_of("mdlm_kit.objective", src, {"mdlm_kit.io.checkpoint", "mdlm_kit.cli", "mdlm_kit.objective"})
    assert found == {"mdlm_kit.io.checkpoint", "mdlm_kit.cli"}
    assert layer_of("mdlm_kit.io.checkpoint") > layer_of("mdlm_kit.objective")


def lightning_private_names() -> set[str]:
    """Every private name Lightning defines: attributes it sets on ``self`` and methods it defines."""
    import re

    import lightning

    names = set()
    for path in Path(lightning.__file__).parent.rglob("*.py"):
        names.update(n for pair in re.findall(r"def (_\w+)|self\.(_\w+)", path.read_text()) for n in pair if n)
    return {n for n in names if not n.startswith("__")}


def private_lightning_uses(path: Path, private: set[str]) -> list[str]:
    """``obj._name`` reads or writes of a Lightning private name, and methods of classes overriding one."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ClassDef):
            found += [f"{path.name}:{f.lineno} def {f.name}" for f in node.body
                      if isinstance(f, ast.FunctionDef) and f.name in private]
    return found


def test_private_lightning_names_only_in_the_gaps_module():
    """No private Lightning attribute or method outside mdlm_kit/lightning_gaps.py, and at most 3 there.
    (The toolkit's own private names are fine as long as Lightning does not use them too.)"""
    private = lightning_private_names()
    assert {"_last_global_step_saved", "_should_accumulate", "_parse_ckpt_path"} <= private  # the scan works
    files = module_files()
    gaps = files.pop("mdlm_kit.lightning_gaps")
    outside = [use for path in files.values() for use in private_lightning_uses(path, private)]
    assert not outside, "\n".join(outside)
    inside = {use.split()[-1].lstrip(".") for use in private_lightning_uses(gaps, private)}
    assert len(inside) <= 3, inside
