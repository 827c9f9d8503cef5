"""The code deps of dvc.yaml, generated: every stage depends on exactly the code its script runs.

A stage's *code deps* are its script (the ``pipeline/*.py`` file its ``cmd`` runs), every hrkd
module the script can import, and the package data files those modules read: script first, then
the rest in sorted order. The imports are read from the source (``import hrkd...``,
``from hrkd... import ...`` and relative imports, function-level ones included, followed
transitively, with the packages' ``__init__`` files); a package data file counts when a module of
the closure names it (``"paper_values.yaml"`` in hrkd/report/paper.py) and it lies in that
module's folder.

    python tests/stage_deps.py --write   # rewrite every stage's code deps in dvc.yaml in place
    python tests/stage_deps.py --check   # exit 1, one line per stale stage, if --write would change it

``--write`` edits the text of each ``deps:`` block and nothing else: the code entries (those under
``hrkd/`` or ``pipeline/``) are replaced by the generated list, and every other line of the block -
data folders, models, comments - follows it in its original order. A ``deps: &name`` block is
written like any other; a stage whose ``deps:`` is an alias (``*name``) or comes from a merge key
is not written, only checked: it must run the same code as the stage that owns the list.
tests/test_stage_deps.py holds dvc.yaml to this, and checks the closure against what the scripts
really load.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = REPO / "dvc.yaml"
FIX = "python tests/stage_deps.py --write"
CODE_ROOTS = ("hrkd/", "pipeline/")


# --- the static import closure -------------------------------------------------------------------

def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of module ``name`` (``a/b.py`` or ``a/b/__init__.py``) under ``root``, if any."""
    base = root / name.replace(".", "/")
    for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(path: Path, root: Path) -> list[str]:
    """The package a module file belongs to, as parts (``hrkd/report/paper.py`` -> [hrkd, report]).

    A package's own ``__init__.py`` belongs to the package itself, so its ``from . import x`` is a sibling.
    """
    return list(path.relative_to(root).parent.parts)


@cache
def _imports(path: Path, root: Path = REPO) -> frozenset[str]:
    """Dotted names of the hrkd modules (or packages) ``path`` imports anywhere in its source."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z
                package = _package_of(path, root)
                if node.level - 1 > len(package):
                    continue
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # `from hrkd.x import module`
    return frozenset(m for m in found if m.split(".")[0] == "hrkd" and module_file(m, root))


def _data_files(module: Path) -> set[Path]:
    """Non-Python files beside ``module`` that its source names (package data it reads)."""
    text = module.read_text(encoding="utf-8")
    return {f for f in module.parent.iterdir()
            if f.is_file() and f.suffix not in (".py", ".pyc") and f.name in text}


def imported_files(script: Path, root: Path = REPO) -> set[str]:
    """Root-relative paths of every hrkd module ``script`` can load (and its package data), itself excluded."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(path, root):
            parts = module.split(".")
            todo += [f for k in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:k]), root))]
    files = {p for p in seen if p != script}
    files |= {d for p in files for d in _data_files(p)}
    return {p.relative_to(root).as_posix() for p in files}


def code_deps(script: str, root: Path = REPO) -> list[str]:
    """The generated code deps of a stage running ``script``: the script, then its closure sorted."""
    return [script] + sorted(imported_files(root / script, root))


def is_code(dep: object) -> bool:
    """A deps entry the generator owns (the script and hrkd files); everything else is kept as written."""
    return isinstance(dep, str) and dep.startswith(CODE_ROOTS)


def stage_script(body: dict) -> str | None:
    """The ``pipeline/*.py`` script a stage's cmd runs (None if it runs none)."""
    cmd = body.get("cmd", "")
    words = " ".join(cmd if isinstance(cmd, list) else [cmd]).split()
    return next((w for w in words if w.startswith("pipeline/") and w.endswith(".py")), None)


def stages(text: str) -> dict[str, dict]:
    """The stage bodies of a dvc.yaml text (anchors and merge keys resolved; ``do`` bodies for foreach/matrix)."""
    spec = yaml.safe_load(text) or {}
    return {name: body.get("do", body) for name, body in (spec.get("stages") or {}).items()}


# --- text-level surgery on the deps blocks --------------------------------------------------------

# dvc.yaml's layout: stage names two spaces in under `stages:`, each stage's `deps:` deeper in.
_STAGE = re.compile(r"^  (?P<name>[^\s#][^:]*):\s*(?:&\S+\s*)?(?:#.*)?$")
_DEPS = re.compile(r"^(?P<indent>\s+)deps:\s*(?P<rest>.*?)\s*$")
_ITEM = re.compile(r"^(?P<indent>\s*)- ")


@dataclass
class Block:
    """One stage's ``deps:`` block: lines [start, end) of the file are its entries."""

    stage: str
    key_line: int
    start: int
    end: int
    alias: str | None = None  # `deps: *name`: the list lives elsewhere
    anchor: str | None = None  # `deps: &name`
    item_indent: str = ""
    # (value, its lines) in file order; value None for a comment or blank line between entries
    entries: list[tuple[object, list[str]]] = field(default_factory=list)


def _blocks(lines: list[str]) -> dict[str, Block]:
    """Find every stage's deps block in the lines of a dvc.yaml."""
    blocks: dict[str, Block] = {}
    in_stages, stage = False, None
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"^\S", line) and not line.startswith("#"):
            in_stages, stage = line.rstrip() == "stages:", None
        elif in_stages and (m := _STAGE.match(line)):
            stage = m["name"].strip()
        elif in_stages and stage and stage not in blocks and (m := _DEPS.match(line)) and len(m["indent"]) > 2:
            rest = re.sub(r"(^|\s+)#.*$", "", m["rest"])
            block = Block(stage, key_line=i, start=i + 1, end=i + 1)
            if rest.startswith("*"):
                block.alias = rest[1:]
            elif rest.startswith("&"):
                block.anchor = rest[1:].split()[0]
                rest = rest[len(block.anchor) + 1:].strip()
            if rest and not rest.startswith("*"):
                raise ValueError(f"dvc.yaml line {i + 1}: stage {stage} writes its deps in flow style ({rest!r}); "
                                 "write them as a block list (one `- entry` a line) so they can be generated")
            if block.alias is None:
                _read_entries(lines, block, key_indent=len(m["indent"]))
                i = block.end - 1
            blocks[stage] = block
        i += 1
    return blocks


def _read_entries(lines: list[str], block: Block, key_indent: int) -> None:
    """Entries of a block list: items at one indent, their continuation lines, comments and blanks between them."""
    pending: list[str] = []  # comments / blank lines not yet known to be inside the block
    j = block.start
    while j < len(lines):
        line = lines[j]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not stripped or stripped.startswith("#"):
            if stripped and indent < key_indent:
                break
            pending.append(line)
        elif ((m := _ITEM.match(line)) and indent >= key_indent
              and (not block.item_indent or m["indent"] == block.item_indent)):
            block.item_indent = m["indent"]
            block.entries += [(None, [p]) for p in pending]
            pending = []
            block.entries.append((yaml.safe_load(line[len(m["indent"]) + 2:]), [line]))
            block.end = j + 1
        elif block.item_indent and indent > len(block.item_indent) and not pending:
            _, item_lines = block.entries[-1]  # a continuation of the previous entry
            block.entries[-1] = (object(), item_lines + [line])  # not a plain path: kept verbatim
            block.end = j + 1
        else:
            break
        j += 1


def _render(block: Block, wanted: list[str]) -> list[str]:
    """The block's lines with its code entries replaced by ``wanted`` (existing lines reused verbatim)."""
    old = {value: item_lines for value, item_lines in block.entries if is_code(value)}
    code = [line for dep in wanted for line in old.get(dep, [f"{block.item_indent}- {dep}\n"])]
    rest = [line for value, item_lines in block.entries if not is_code(value) for line in item_lines]
    return code + rest


def _difference(have: list[str], want: list[str]) -> str:
    missing = [d for d in want if d not in have]
    extra = [d for d in have if d not in want]
    return "; ".join(filter(None, [f"missing {', '.join(missing)}" if missing else "",
                                   f"not imported {', '.join(extra)}" if extra else ""])) or "out of order"


@dataclass
class Plan:
    text: str  # dvc.yaml with every writable block regenerated
    stale: list[str]  # one line per stage whose code deps are not the generated ones
    problems: list[str]  # stages --write cannot fix (shared lists running different code, ...)


def plan(text: str, root: Path = REPO) -> Plan:
    """What ``--write`` makes of a dvc.yaml text, and which stages are stale in it."""
    lines = text.splitlines(keepends=True)
    blocks = _blocks(lines)
    bodies = stages(text)
    stale: list[str] = []
    problems: list[str] = []
    edits: list[tuple[int, int, list[str]]] = []
    shared: list[str] = []  # stages whose deps list is another's (alias or merge key): checked once written
    for name, body in bodies.items():
        script = stage_script(body)
        if script is None:
            continue
        want = code_deps(script, root)
        have = [d for d in body.get("deps") or [] if is_code(d)]
        block = blocks.get(name)
        if block is None or block.alias is not None:
            shared.append(name)
            continue
        if not block.item_indent:  # empty block: indent items two past the key
            key = lines[block.key_line]
            block.item_indent = " " * (len(key) - len(key.lstrip()) + 2)
        new = _render(block, want)
        if new != lines[block.start:block.end]:
            stale.append(f"dvc.yaml: stage {name} has stale code deps ({_difference(have, want)}): run {FIX}")
            edits.append((block.start, block.end, new))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    text = "".join(lines)
    written = stages(text) if shared else {}
    for name in shared:  # the owner's (regenerated) list must fit this stage too
        script = stage_script(written[name])
        want = code_deps(script, root)
        have = [d for d in written[name].get("deps") or [] if is_code(d)]
        if have != want:
            how = f"*{blocks[name].alias}" if name in blocks else "a merge key"
            problems.append(f"dvc.yaml: stage {name} shares its deps list ({how}), but {script} runs other "
                            f"code ({_difference(have, want)}): give the stage a deps list of its own")
    return Plan(text, stale, problems)


def check(path: Path = DVC_YAML, root: Path = REPO) -> list[str]:
    """One line per stale stage (and per unfixable one) of the dvc.yaml at ``path``; [] when it is current."""
    result = plan(path.read_text(encoding="utf-8"), root)
    return result.stale + result.problems


def write(path: Path = DVC_YAML, root: Path = REPO) -> Plan:
    """Rewrite the code deps of ``path`` in place; returns the plan (its stale lines = the stages changed)."""
    text = path.read_text(encoding="utf-8")
    result = plan(text, root)
    if result.text != text:
        after = plan(result.text, root)  # the written file must be a fixed point
        if after.stale:
            raise RuntimeError(f"stage_deps: --write is not idempotent on {path}: {after.stale}")
        path.write_text(result.text, encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the code deps of every stage in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if --write would change anything")
    parser.add_argument("--file", type=Path, default=DVC_YAML, help="the dvc.yaml [%(default)s]")
    parser.add_argument("--root", type=Path, default=REPO, help="the tree holding hrkd/ and pipeline/ [%(default)s]")
    args = parser.parse_args(argv)
    try:
        if args.check:
            lines = check(args.file, args.root)
            for line in lines:
                print(line)
            return 1 if lines else 0
        result = write(args.file, args.root)
    except ValueError as err:  # a deps block it cannot edit (flow style)
        print(err, file=sys.stderr)
        return 2
    for line in result.stale:
        print(line.replace(f": run {FIX}", ": rewritten"))
    for line in result.problems:
        print(line, file=sys.stderr)
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
