"""Nothing imports upward: each layer of hrkd/ imports only the layers before it.

Function-level imports count too: hiding an import inside a function does not make the
dependency go away, it only hides the loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the most specific prefix that names it.
LAYERS = [
    ("hrkd", "hrkd.errors", "hrkd.io", "hrkd.registry", "hrkd.config", "hrkd.cli"),
    ("hrkd.data", "hrkd.losses", "hrkd.relational", "hrkd.models"),
    ("hrkd.engine",),
    ("hrkd.driver",),
    ("hrkd.teachers", "hrkd.distill"),
    ("hrkd.metakd",),  # the rival baseline, built on the same driver and teacher loading
    ("hrkd.report",),
]


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layering.py: add it to LAYERS")
    return best[0]


def imports_of(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hrkd") and not node.level:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("hrkd")]
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted((ROOT / "hrkd").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_no_module_imports_a_later_layer(path):
    me = module_name(path)
    upward = [f"{path.relative_to(ROOT)}:{line} imports {target}" for line, target in imports_of(path)
              if layer_of(target) > layer_of(me)]
    assert not upward, "; ".join(upward)


def test_the_check_sees_a_function_level_upward_import(tmp_path):
    bad = tmp_path / "teachers.py"
    bad.write_text("def f():\n    from hrkd.metakd.teacher import MetaTeacherObjective\n")
    assert [layer_of(t) for _, t in imports_of(bad)] == [layer_of("hrkd.metakd.teacher")]
    assert layer_of("hrkd.metakd.teacher") > layer_of("hrkd.teachers")
