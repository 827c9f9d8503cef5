"""The prepare_data / fewshot stage scripts: outputs on success, one line + exit 2 on bad input."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from hrkd.data.format import read_meta, read_stats

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon" / "domain_sentiment_data.tar.gz"


def _app(script: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"cli_{script}", REPO / "pipeline" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.app


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A temp folder with a copy of params.yaml as cwd; logging restored afterwards."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    # Pin what the assertions below count on, whatever the repository's defaults become.
    _edit_params(
        tmp_path,
        profile="demo",
        demo={"seed": 1234, "mnli": {"train": 480, "dev": 80, "test": 120}, "amazon": {"train": 320, "dev": 60, "test": 100}},
        fewshot={"tasks": ["mnli"], "rates": [0.02, 0.05, 0.1, 0.2]},
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HRKD_LOG_LEVEL", "WARNING")  # stderr then holds only the error line
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield tmp_path
    root.handlers[:] = handlers
    root.setLevel(level)


def _edit_params(folder: Path, **changes: Any) -> None:
    raw = yaml.safe_load((folder / "params.yaml").read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        node = raw
        *parents, key = dotted.split("__")
        for part in parents:
            node = node[part]
        node[key] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")


def _run(script: str, *args: str):
    return CliRunner().invoke(_app(script), list(args))


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "params.yaml")


def test_prepare_and_fewshot_demo(workdir: Path) -> None:
    assert _run("prepare_data", "--task", "mnli").exit_code == 0
    assert read_stats(workdir / "data" / "prepared" / "mnli")["telephone"]["train"] == 509
    result = _run("fewshot", "--task", "mnli")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (workdir / "data" / "fewshot" / "mnli").iterdir()) == ["0.02", "0.05", "0.1", "0.2"]
    meta = read_meta(workdir / "data" / "fewshot" / "mnli" / "0.05")
    assert meta.fewshot_rate == 0.05 and meta.source == "demo"
    assert read_stats(workdir / "data" / "fewshot" / "mnli" / "0.1")["fiction"]["train"] == 47
    assert not [p for p in workdir.rglob("*") if ".tmp-" in p.name]


def test_custom_out_and_params_options(workdir: Path) -> None:
    (workdir / "conf").mkdir()
    os.replace(workdir / "params.yaml", workdir / "conf" / "p.yaml")
    result = _run("prepare_data", "--task", "amazon", "--params", "conf/p.yaml", "--out", "x/amz")
    assert result.exit_code == 0, result.output
    result = _run("fewshot", "--task", "amazon", "--params", "conf/p.yaml", "--prepared", "x/amz", "--out", "x/few")
    assert result.exit_code == 0, result.output
    assert read_meta(workdir / "x" / "few" / "0.2").task == "amazon"
    assert read_stats(workdir / "x" / "few" / "0.2")["dvd"]["train"] == 64
    assert sorted(p.name for p in workdir.iterdir()) == ["conf", "x"]


def test_unknown_task(workdir: Path) -> None:
    line = _one_error_line(_run("prepare_data", "--task", "snli"))
    assert "unknown task 'snli'" in line and "'mnli'" in line  # lists the known tasks
    assert _leftovers(workdir) == []


def test_malformed_params(workdir: Path) -> None:
    (workdir / "params.yaml").write_text("profile: demo\ndata: [unclosed\n", encoding="utf-8")
    assert "is not valid YAML at line" in _one_error_line(_run("prepare_data", "--task", "mnli"))
    (workdir / "params.yaml").write_text("profil: demo\n", encoding="utf-8")
    assert "params.yaml" in _one_error_line(_run("fewshot", "--task", "mnli"))
    assert _leftovers(workdir) == []


def test_rate_outside_unit_interval(workdir: Path) -> None:
    _edit_params(workdir, fewshot__rates=[0.02, 1.5])
    line = _one_error_line(_run("fewshot", "--task", "mnli"))
    assert "fewshot.rates" in line
    assert _leftovers(workdir) == []


def test_missing_prepared_folder(workdir: Path) -> None:
    line = _one_error_line(_run("fewshot", "--task", "mnli"))
    assert "run the prepare stage first" in line
    assert _leftovers(workdir) == []


def test_missing_archive_paper_profile(workdir: Path) -> None:
    _edit_params(workdir, profile="paper", data__amazon__source="data/raw/none.tar.gz")
    line = _one_error_line(_run("prepare_data", "--task", "amazon"))
    assert "none.tar.gz not found" in line and "dvc update data.dvc" in line
    assert _leftovers(workdir) == []


@pytest.mark.skipif(not ARCHIVE.is_file(), reason="real archive not available")
def test_corrupt_archive_keeps_previous_output(workdir: Path) -> None:
    assert _run("prepare_data", "--task", "amazon").exit_code == 0  # demo output from a previous run
    before = {p: p.read_bytes() for p in (workdir / "data").rglob("*") if p.is_file()}
    (workdir / "bad.tar.gz").write_bytes(ARCHIVE.read_bytes()[:100_000])
    _edit_params(workdir, profile="paper", data__amazon__source="bad.tar.gz")
    assert "not a readable .tar.gz archive" in _one_error_line(_run("prepare_data", "--task", "amazon"))
    assert {p: p.read_bytes() for p in (workdir / "data").rglob("*") if p.is_file()} == before


def test_real_process_exit_code(workdir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "prepare_data.py"), "--task", "nope"],
        capture_output=True, text=True, cwd=workdir, env={**os.environ, "HRKD_LOG_LEVEL": "WARNING"}, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown task 'nope'") and proc.stderr.count("\n") == 1
    assert proc.stdout == ""
