"""Few-shot copies: the front of each train split, nested across rates, dev/test untouched."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hrkd.data.fewshot import fewshot_size, make_fewshot, rate_from_tag, rate_tag
from hrkd.data.format import TaskMeta, make_frame, read_meta, read_split, read_stats, write_task
from hrkd.errors import HRKDError

RATES = [0.02, 0.05, 0.1, 0.2]


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    meta = TaskMeta("mnli", "mnli", ("entailment", "neutral", "contradiction"), ("big", "small"), True, "unit", "demo")
    sizes = {"big": {"train": 1000, "dev": 30, "test": 40}, "small": {"train": 37, "dev": 5, "test": 6}}
    splits = {
        d: {
            s: make_frame([f"{d}/{s}/{i}" for i in range(n)], [f"p{i}" for i in range(n)], [f"h{i}" for i in range(n)],
                          [i % 3 for i in range(n)])
            for s, n in parts.items()
        }
        for d, parts in sizes.items()
    }
    write_task(tmp_path / "prepared", meta, splits)
    return tmp_path / "prepared"


def test_rate_tags() -> None:
    assert [rate_tag(r) for r in RATES] == ["0.02", "0.05", "0.1", "0.2"]
    assert rate_tag(1) == "1.0" and rate_tag(0.005) == "0.005"
    assert [rate_from_tag(rate_tag(r)) for r in RATES] == RATES


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0000001, 2, float("nan"), "0.1", True])
def test_rates_outside_unit_interval_are_rejected(bad, prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(HRKDError, match="outside \\(0, 1\\]") as err:
        make_fewshot(prepared, tmp_path / "out", [0.02, bad])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_size_rule() -> None:
    # round half up of rate * n on the written decimal, at least one row.
    assert [fewshot_size(r, 1000) for r in RATES] == [20, 50, 100, 200]
    assert [fewshot_size(r, 37) for r in RATES] == [1, 2, 4, 7]
    assert fewshot_size(0.02, 69613) == 1392
    assert fewshot_size(0.05, 10) == 1  # 0.5 rounds up
    assert fewshot_size(0.01, 10) == 1  # never empty
    assert fewshot_size(1.0, 37) == 37


def test_front_nested_and_dev_test_identical(prepared: Path, tmp_path: Path) -> None:
    sizes = make_fewshot(prepared, tmp_path / "few", RATES)
    assert sizes == {
        "0.02": {"big": 20, "small": 1},
        "0.05": {"big": 50, "small": 2},
        "0.1": {"big": 100, "small": 4},
        "0.2": {"big": 200, "small": 7},
    }
    assert sorted(p.name for p in (tmp_path / "few").iterdir()) == ["0.02", "0.05", "0.1", "0.2"]
    full = {d: read_split(prepared, d, "train") for d in ("big", "small")}
    previous: dict[str, list[str]] = {"big": [], "small": []}
    for rate in RATES:
        folder = tmp_path / "few" / rate_tag(rate)
        meta = read_meta(folder)
        assert meta.fewshot_rate == rate and meta.domains == ("big", "small") and meta.source == "unit"
        for domain in ("big", "small"):
            train = read_split(folder, domain, "train")
            n = math.floor(rate * len(full[domain]) + 0.5) or 1
            assert train.equals(full[domain].iloc[:n])
            assert train["uid"].tolist()[: len(previous[domain])] == previous[domain]  # nested
            previous[domain] = train["uid"].tolist()
            for split in ("dev", "test"):
                name = f"{domain}/{split}.parquet"
                assert (folder / name).read_bytes() == (prepared / name).read_bytes()
        stats = read_stats(folder)
        assert stats["small"]["train"] == sizes[rate_tag(rate)]["small"]
        assert stats["big"]["dev"] == 30 and stats["big"]["test"] == 40


def test_rerun_is_byte_identical_and_replaces_old_rates(prepared: Path, tmp_path: Path) -> None:
    make_fewshot(prepared, tmp_path / "a", RATES)
    make_fewshot(prepared, tmp_path / "b", RATES)
    files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert files(tmp_path / "a") == files(tmp_path / "b")
    make_fewshot(prepared, tmp_path / "a", [0.5])
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["0.5"]


def test_bad_inputs(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(HRKDError, match="run the prepare stage first"):
        make_fewshot(tmp_path / "missing", tmp_path / "out", RATES)
    with pytest.raises(HRKDError, match="repeat a rate"):
        make_fewshot(prepared, tmp_path / "out", [0.1, 0.10])
    with pytest.raises(HRKDError, match="empty"):
        make_fewshot(prepared, tmp_path / "out", [])
    make_fewshot(prepared, tmp_path / "few", [0.5])
    with pytest.raises(HRKDError, match="already a few-shot copy"):
        make_fewshot(tmp_path / "few" / "0.5", tmp_path / "out", [0.1])
    (prepared / "small" / "dev.parquet").unlink()
    with pytest.raises(HRKDError, match="not found"):
        make_fewshot(prepared, tmp_path / "out", RATES)
    assert not (tmp_path / "out").exists()
