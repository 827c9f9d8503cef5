"""Atomic writes: a stage's outputs appear whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hrkd.errors import HRKDError


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only on success.

    A crash or Ctrl-C inside the block leaves the previous ``path`` (or nothing) behind,
    never a half-written directory that a later stage could mistake for a result.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling file for writing; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON deterministically (sorted keys, fixed indent, trailing newline)."""
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_stage_json(path: str | os.PathLike, stage: str) -> Any:
    """Read a JSON file another DVC stage writes, or stop with one line naming that stage."""
    path = Path(path)
    if not path.is_file():
        raise HRKDError(f"{path} not found: run `dvc repro {stage}` (or `dvc repro`) before the report")
    try:
        return read_json(path)
    except (OSError, ValueError) as err:
        raise HRKDError(f"{path} is not readable JSON ({err}); rerun `dvc repro -f {stage}`") from None
