"""Architecture rules that import-linter cannot express (docs/architecture.md): DeepSpeed's internals are read
only in aim_ds/shards/; no module reads another module's private attributes; no class is over 300 lines or
function over 80 (argparse builders aside). The import contracts themselves are in pyproject.toml, checked by
`lint-imports` (.ci/run) and by the last test."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "aim_ds"
# DeepSpeed's public entry points any layer may use; everything else of deepspeed is an internal
PUBLIC_DEEPSPEED = (
    "deepspeed",
    "deepspeed.comm",
    "deepspeed.accelerator",
    "deepspeed.checkpoint",
    "deepspeed.pipe",
    "deepspeed.utils.zero_to_fp32",
)
# modules by their path in aim_ds/: tools/estimate.py calls DeepSpeed's published memory estimators, which live in
# deepspeed.runtime.zero
INTERNALS_ALLOWED = {"tools/estimate.py"}
MAX_CLASS, MAX_FUNCTION = 300, 80
# private attributes of other libraries' objects read outside aim_ds/shards/ (which reads DeepSpeed's by design)
FOREIGN_PRIVATES_ALLOWED = {
    ("driver/args.py", "_ArgumentGroup"),  # argparse's argument-group type, for a type check
    ("hf/callback.py", "_get_output_dir"),  # transformers.Trainer: a hyperparameter-search trial's run folder
}
ARGPARSE_BUILDERS = {"build_parser", "add_arguments"}


def _sources():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def deepspeed_internals(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of a DeepSpeed internal in a module's source."""
    return [
        (line, m)
        for line, m in _imports(ast.parse(source))
        if m.split(".")[0] == "deepspeed" and m not in PUBLIC_DEEPSPEED
    ]


def oversized(source: str) -> list[tuple[int, str, int, int]]:
    """(line, name, lines, limit) of every class over MAX_CLASS and function over MAX_FUNCTION lines."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            limit = MAX_CLASS
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in ARGPARSE_BUILDERS:
            limit = MAX_FUNCTION
        else:
            continue
        n = node.end_lineno - node.lineno + 1
        if n > limit:
            out.append((node.lineno, node.name, n, limit))
    return out


def foreign_privates(source: str) -> list[tuple[int, str]]:
    """(line, expression) of every `x._name` where x is not self/cls and _name is not one of this module's own
    names (a function, class or variable it defines, or an attribute it sets on self/cls): a read or write of
    another module's private state."""
    tree = ast.parse(source)
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _on_self(node):
            own.add(node.attr)
    return sorted(
        (node.lineno, ast.unparse(node))
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.endswith("__")
        and not _on_self(node)
        and node.attr not in own
    )


def _on_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def _where(p: Path, line: int) -> str:
    return f"{p.relative_to(PKG.parent)}:{line}"


def test_only_shards_read_deepspeed_internals():
    found = [
        f"{_where(p, line)} {mod}"
        for p in _sources()
        if "shards" not in p.relative_to(PKG).parts and p.relative_to(PKG).as_posix() not in INTERNALS_ALLOWED
        for line, mod in deepspeed_internals(p.read_text())
    ]
    assert not found, "DeepSpeed internals imported outside aim_ds/shards/: " + "; ".join(found)


def test_no_module_reads_another_modules_private_attributes():
    found = [
        f"{_where(p, line)} {expr}"
        for p in _sources()
        if "shards" not in p.relative_to(PKG).parts
        for line, expr in foreign_privates(p.read_text())
        if (p.relative_to(PKG).as_posix(), expr.rsplit(".", 1)[1]) not in FOREIGN_PRIVATES_ALLOWED
    ]
    assert not found, "private attributes of another module's objects: " + "; ".join(found)


def test_every_allowance_names_a_module_that_needs_it():
    """The allowances name modules by their path: an entry left behind by a move (or no longer needed) fails here
    instead of allowing nothing, or another module of the same name."""
    for rel in INTERNALS_ALLOWED:
        assert (PKG / rel).is_file(), f"INTERNALS_ALLOWED names aim_ds/{rel}, which does not exist"
        assert deepspeed_internals((PKG / rel).read_text()), f"aim_ds/{rel} imports no DeepSpeed internal"
    for rel, name in FOREIGN_PRIVATES_ALLOWED:
        assert (PKG / rel).is_file(), f"FOREIGN_PRIVATES_ALLOWED names aim_ds/{rel}, which does not exist"
        read = {expr.rsplit(".", 1)[1] for _, expr in foreign_privates((PKG / rel).read_text())}
        assert name in read, f"aim_ds/{rel} reads no {name}"


def test_no_class_over_300_lines_no_function_over_80():
    found = [
        f"{_where(p, line)} {name} is {n} lines (limit {limit})"
        for p in _sources()
        for line, name, n, limit in oversized(p.read_text())
    ]
    assert not found, "; ".join(found)


def test_the_checks_can_fail():
    src = (
        "import deepspeed.comm\ndef f():\n    from deepspeed.runtime.zero.stage3 import X\n"
        + "def g():\n"
        + "    pass\n" * 80
    )
    assert deepspeed_internals(src) == [(3, "deepspeed.runtime.zero.stage3")]
    assert oversized(src) == [(4, "g", 81, MAX_FUNCTION)]
    src = (
        "class A:\n    def __init__(self, p):\n        self._mine = p._theirs\n"
        "    def f(self, other):\n        return other._mine + self._x + other.__class__.__name__\n"
        "def g(plugin):\n    plugin._step += 1\n"
    )
    assert foreign_privates(src) == [(3, "p._theirs"), (7, "plugin._step")]


@pytest.mark.skipif(
    shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None, reason="import-linter not installed"
)
def test_import_contracts():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    r = subprocess.run([exe, "--no-logo", "--no-cache"], cwd=PKG.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
