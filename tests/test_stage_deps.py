"""dvc.yaml cannot lie about code: every stage depends on exactly the hrkd modules its script imports.

The imports are read from the source (every ``import hrkd...`` / ``from hrkd... import``,
function-level ones included, followed transitively, with the packages' ``__init__`` files), so a
module a stage runs but does not list - a default changed in hrkd/config.py, say - fails here
instead of leaving a stale stage that DVC calls up to date.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _module_file(name: str) -> Path | None:
    for candidate in (REPO / (name.replace(".", "/") + ".py"), REPO / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _imports(path: Path) -> frozenset[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "hrkd"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "hrkd":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from hrkd.x import module`
    return frozenset(m for m in found if _module_file(m))


def imported_files(script: Path) -> set[str]:
    """Repository-relative paths of every hrkd module ``script`` can load, itself excluded."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(path):
            parts = module.split(".")
            todo += [f for k in range(1, len(parts) + 1) if (f := _module_file(".".join(parts[:k])))]
    return {str(p.relative_to(REPO)) for p in seen if p != script}


def _stages() -> list[tuple[str, dict]]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    return [(name, body.get("do", body)) for name, body in spec["stages"].items()]


@pytest.mark.parametrize("name,stage", _stages(), ids=[n for n, _ in _stages()])
def test_stage_lists_exactly_the_modules_its_script_imports(name, stage):
    script = next(w for w in stage["cmd"].split() if w.startswith("pipeline/"))
    deps = {d for d in stage.get("deps", []) if isinstance(d, str)}
    assert script in deps
    needed = imported_files(REPO / script)
    missing = sorted(f for f in needed if f not in deps)
    assert not missing, f"stage {name} runs {missing} but does not depend on them: add them to its deps in dvc.yaml"
    listed = {d for d in deps if d.startswith("hrkd/") and d.endswith(".py")}
    extra = sorted(listed - needed)
    assert not extra, f"stage {name} depends on {extra}, which its script never imports: drop them from dvc.yaml"


def test_the_closure_follows_function_level_and_transitive_imports(tmp_path):
    # pipeline/report.py imports hrkd.report.build inside its command function; build imports
    # hrkd.report.tables at module level, which imports hrkd.relational.
    files = imported_files(REPO / "pipeline" / "report.py")
    assert {"hrkd/report/build.py", "hrkd/report/tables.py", "hrkd/relational.py", "hrkd/__init__.py",
            "hrkd/report/__init__.py"} <= files
    assert "hrkd/report/readme.py" not in files  # only pipeline/readme_figures.py runs it
