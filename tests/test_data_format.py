"""On-disk task format: round trip, stats, validation, determinism, split helpers."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hrkd.data.format import (
    TaskMeta,
    apportion,
    check_domain_name,
    exact_fraction,
    keyed_order,
    make_frame,
    read_meta,
    read_split,
    read_stats,
    stratified_split,
    write_task,
)
from hrkd.errors import HRKDError
from helpers import tree_bytes


def _pair_task() -> tuple[TaskMeta, dict[str, dict[str, pd.DataFrame]]]:
    meta = TaskMeta("toy", "mnli", ("entailment", "neutral", "contradiction"), ("a", "b"), True, "unit", "paper")
    splits = {
        d: {
            s: make_frame(
                [f"{d}/{s}/{i}" for i in range(n)],
                [f"premise {d} {i} & \"q\"" for i in range(n)],
                [f"hypothesis {i}" if i else "" for i in range(n)],
                [i % 3 for i in range(n)],
            )
            for s, n in (("train", 7), ("dev", 3), ("test", 4))
        }
        for d in ("a", "b")
    }
    return meta, splits


def test_round_trip_meta_stats_and_columns(tmp_path: Path) -> None:
    meta, splits = _pair_task()
    write_task(tmp_path / "toy", meta, splits)
    assert read_meta(tmp_path / "toy") == meta
    stats = read_stats(tmp_path / "toy")
    assert stats["a"] == {
        "train": 7,
        "dev": 3,
        "test": 4,
        "label_counts": {
            "train": {"entailment": 3, "neutral": 2, "contradiction": 2},
            "dev": {"entailment": 1, "neutral": 1, "contradiction": 1},
            "test": {"entailment": 2, "neutral": 1, "contradiction": 1},
        },
    }
    frame = read_split(tmp_path / "toy", "b", "train")
    assert list(frame.columns) == ["uid", "text", "text_pair", "label"]
    assert frame["uid"].tolist() == [f"b/train/{i}" for i in range(7)]
    assert frame["text"].iloc[3] == 'premise b 3 & "q"'
    assert frame["text_pair"].iloc[0] == ""  # an empty hypothesis is data, not a missing value
    assert frame["label"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert str(frame["label"].dtype) == "int64"
    schema = pq.read_schema(tmp_path / "toy" / "b" / "train.parquet")
    assert schema.types == [pa.string(), pa.string(), pa.string(), pa.int64()]
    assert schema.metadata is None  # no pandas metadata with its version string


def test_single_sentence_text_pair_is_null_and_meta_json_exact(tmp_path: Path) -> None:
    meta = TaskMeta("rev", "amazon", ("negative", "positive"), ("books",), False, "demo", "demo", fewshot_rate=0.05)
    frames = {s: make_frame([f"{s}{i}" for i in range(2)], ["good", "bad"], None, [1, 0]) for s in ("train", "dev", "test")}
    write_task(tmp_path / "rev", meta, {"books": frames})
    assert read_split(tmp_path / "rev", "books", "dev")["text_pair"].isna().all()
    assert (tmp_path / "rev" / "meta.json").read_text() == (
        '{\n  "domains": [\n    "books"\n  ],\n  "fewshot_rate": 0.05,\n  "kind": "amazon",\n'
        '  "labels": [\n    "negative",\n    "positive"\n  ],\n  "profile": "demo",\n  "source": "demo",\n'
        '  "task": "rev",\n  "text_pair": false\n}\n'
    )


def test_rewrite_is_byte_identical(tmp_path: Path) -> None:
    meta, splits = _pair_task()
    write_task(tmp_path / "one", meta, splits)
    write_task(tmp_path / "two", meta, splits)
    first, second = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "two")
    assert len(first) == 2 + 2 * 3
    assert first == second


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.assign(text=[""] + f["text"].tolist()[1:]), "empty text"),
        (lambda f: f.assign(label=[3] + f["label"].tolist()[1:]), "labels must be ids"),
        (lambda f: f.assign(uid=["x"] * len(f)), "unique"),
        (lambda f: f.assign(text_pair=[None] * len(f)), "text_pair is missing"),
        (lambda f: f[["uid", "text", "label", "text_pair"]], "columns"),
    ],
)
def test_bad_split_is_rejected_and_nothing_written(tmp_path: Path, mutate, message: str) -> None:
    meta, splits = _pair_task()
    splits["b"]["dev"] = mutate(splits["b"]["dev"])
    with pytest.raises(HRKDError, match=message) as err:
        write_task(tmp_path / "out", meta, splits)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_previous_output(tmp_path: Path) -> None:
    meta, splits = _pair_task()
    write_task(tmp_path / "out", meta, splits)
    before = tree_bytes(tmp_path / "out")
    splits["a"]["test"] = splits["a"]["test"].assign(text="")
    with pytest.raises(HRKDError):
        write_task(tmp_path / "out", meta, splits)
    assert tree_bytes(tmp_path / "out") == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_read_split_checks_columns_and_presence(tmp_path: Path) -> None:
    meta, splits = _pair_task()
    write_task(tmp_path / "t", meta, splits)
    pq.write_table(pa.table({"uid": ["x"], "sentence": ["y"], "label": [0]}), tmp_path / "t" / "a" / "dev.parquet")
    with pytest.raises(HRKDError, match="has columns"):
        read_split(tmp_path / "t", "a", "dev")
    (tmp_path / "t" / "a" / "test.parquet").write_bytes(b"not parquet")
    with pytest.raises(HRKDError, match="not a readable parquet"):
        read_split(tmp_path / "t", "a", "test")
    with pytest.raises(HRKDError, match="not found"):
        read_split(tmp_path / "t", "c", "train")
    with pytest.raises(HRKDError, match="unknown split"):
        read_split(tmp_path / "t", "a", "validation")
    with pytest.raises(HRKDError, match="run the prepare stage first"):
        read_meta(tmp_path / "missing")


@pytest.mark.parametrize("name", ["books", "kitchen", "face-to-face", "v1.2", "A_b"])
def test_safe_domain_names_pass(name: str) -> None:
    assert check_domain_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", "kitchen_&_housewares", "-x", "a b", "x" * 65])
def test_unsafe_domain_names_fail(name: str) -> None:
    with pytest.raises(HRKDError, match="not a safe folder name"):
        check_domain_name(name)


def test_meta_validation() -> None:
    with pytest.raises(HRKDError, match="two distinct labels"):
        TaskMeta("t", "custom", ("a", "a"), ("d",), False, "s", "demo")
    with pytest.raises(HRKDError, match="unknown kind"):
        TaskMeta("t", "glue", ("a", "b"), ("d",), False, "s", "demo")
    with pytest.raises(HRKDError, match="outside"):
        TaskMeta("t", "custom", ("a", "b"), ("d",), False, "s", "demo", fewshot_rate=0.0)


def test_exact_fraction_uses_the_written_decimal() -> None:
    assert exact_fraction(0.1) == Fraction(1, 10)
    assert exact_fraction(0.02) == Fraction(1, 50)
    assert Fraction(0.1) != Fraction(1, 10)  # why exact_fraction exists


def test_apportion_values() -> None:
    assert apportion(199, [1000, 1000]) == [100, 99]
    assert apportion(170, [900, 901]) == [85, 85]
    assert apportion(171, [900, 901]) == [85, 86]
    assert apportion(10, [1, 2, 7]) == [1, 2, 7]
    assert apportion(5, [3, 3, 3]) == [2, 2, 1]
    with pytest.raises(HRKDError):
        apportion(4, [1, 2])


def test_keyed_order_is_a_stable_permutation() -> None:
    keys = [f"k{i}" for i in range(50)]
    order = keyed_order(keys, 7, "s")
    assert sorted(order) == list(range(50))
    assert order == keyed_order(keys, 7, "s")
    assert order != keyed_order(keys, 8, "s")
    assert order != list(range(50))
    # A row's rank depends on its key only: dropping other rows keeps relative order.
    sub = keyed_order(keys[:25], 7, "s")
    assert [i for i in order if i < 25] == sub


def test_stratified_split_counts_balance_and_mixing() -> None:
    labels = [0] * 1000 + [1] * 1000
    keys = [f"r{i}" for i in range(2000)]
    rows = stratified_split(labels, keys, {"train": 1631, "dev": 170, "test": 199}, 11111, "books")
    assert {s: len(r) for s, r in rows.items()} == {"train": 1631, "dev": 170, "test": 199}
    assert sorted(rows["train"] + rows["dev"] + rows["test"]) == list(range(2000))
    assert sum(labels[i] == 0 for i in rows["test"]) == 100
    assert sum(labels[i] == 0 for i in rows["dev"]) == 85
    assert sum(labels[i] == 0 for i in rows["train"]) == 815
    front = [labels[i] for i in rows["train"][:20]]
    assert 0 in front and 1 in front
    assert rows == stratified_split(labels, keys, {"train": 1631, "dev": 170, "test": 199}, 11111, "books")
    assert rows != stratified_split(labels, keys, {"train": 1631, "dev": 170, "test": 199}, 11112, "books")
    with pytest.raises(HRKDError, match="add up"):
        stratified_split(labels, keys, {"train": 10, "dev": 1, "test": 1}, 1, "x")
