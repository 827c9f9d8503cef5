"""Custom tasks: CSV / JSONL / parquet, one file or one per split, with clear one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hrkd.config import CustomData, parse_params
from hrkd.data.custom import build_custom, default_labels
from hrkd.data.format import read_meta, read_split, read_stats
from hrkd.data.prepare import prepare_task
from hrkd.errors import HRKDError

REPO = Path(__file__).resolve().parents[1]


def _rows(n_per_domain: dict[str, int]) -> pd.DataFrame:
    rows = []
    for domain, n in n_per_domain.items():
        for i in range(n):
            rows.append({"domain": domain, "text": f"{domain} text {i}", "label": ["neg", "pos"][i % 2]})
    return pd.DataFrame(rows)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")), encoding="utf-8")
    else:
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_single_file_stratified_split(tmp_path: Path, ext: str) -> None:
    path = _write(_rows({"shop": 100, "blog": 41}), tmp_path / f"data.{ext}")
    splits, labels, domains, source = build_custom(CustomData(path=str(path)))
    assert (labels, domains, source) == (["neg", "pos"], ["blog", "shop"], str(path))
    sizes = {d: {s: len(f) for s, f in splits[d].items()} for d in domains}
    # dev = test = round_half_up(0.1 * n); 41 rows -> 4 each, train the rest.
    assert sizes == {"blog": {"train": 33, "dev": 4, "test": 4}, "shop": {"train": 80, "dev": 10, "test": 10}}
    shop = splits["shop"]
    assert shop["test"]["label"].tolist().count(0) == 5 and shop["dev"]["label"].tolist().count(1) == 5
    all_uids = sorted(u for f in shop.values() for u in f["uid"])
    assert all_uids == sorted(f"data.{ext}:{i}" for i in range(100))  # shop rows come first
    assert shop["train"]["text_pair"].isna().all()


def test_formats_give_identical_splits(tmp_path: Path) -> None:
    frame = _rows({"a": 30, "b": 30})
    out = [build_custom(CustomData(path=str(_write(frame, tmp_path / f"d.{e}"))))[0] for e in ("csv", "jsonl", "parquet")]
    for other in out[1:]:
        for split in ("train", "dev", "test"):
            assert other["a"][split]["text"].tolist() == out[0]["a"][split]["text"].tolist()


def test_labels_param_order_domains_filter_and_pairs(tmp_path: Path) -> None:
    frame = _rows({"x": 20, "y": 20, "z": 20}).assign(second=lambda f: "pair " + f["text"])
    path = _write(frame, tmp_path / "d.csv")
    cfg = CustomData(path=str(path), labels=["pos", "neg"], domains=["z", "x"], text_pair_column="second", seed=3)
    splits, labels, domains, _ = build_custom(cfg)
    assert labels == ["pos", "neg"] and domains == ["z", "x"]
    row = splits["z"]["train"].iloc[0]
    assert row["text_pair"] == "pair " + row["text"]
    assert row["label"] == (0 if int(row["text"].split()[-1]) % 2 else 1)


def test_default_labels_sort_numbers_numerically() -> None:
    assert default_labels(["10", "9", "1", "9"]) == ["1", "9", "10"]
    assert default_labels(["b", "a", "10"]) == ["10", "a", "b"]


def test_split_files_keep_their_order(tmp_path: Path) -> None:
    frame = _rows({"a": 12, "b": 12}).assign(label=lambda f: [i % 3 for i in range(len(f))])
    train = _write(frame, tmp_path / "train.parquet")
    test = _write(frame.iloc[::-1], tmp_path / "test.csv")
    splits, labels, _, _ = build_custom(CustomData(train=str(train), test=str(test), dev_fraction=0.25))
    assert labels == ["0", "1", "2"]
    assert [len(splits["a"][s]) for s in ("train", "dev", "test")] == [9, 3, 12]
    assert splits["a"]["test"]["text"].tolist() == [f"a text {i}" for i in range(11, -1, -1)]
    assert splits["a"]["test"]["uid"].iloc[0] == "test.csv:12"  # b rows come first in the file


def test_prepare_writes_custom_task_deterministically(tmp_path: Path) -> None:
    path = _write(_rows({"a": 30, "b": 50}), tmp_path / "d.jsonl")
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["data"]["custom"].update(path=str(path))
    params = parse_params(raw)  # demo profile: custom tasks still read the user's file
    prepare_task(params, "custom", tmp_path / "one")
    prepare_task(params, "custom", tmp_path / "two")
    meta = read_meta(tmp_path / "one")
    assert (meta.kind, meta.labels, meta.domains, meta.source, meta.profile) == (
        "custom", ("neg", "pos"), ("a", "b"), str(path), "demo"
    )
    assert read_stats(tmp_path / "one")["b"]["test"] == 5
    assert read_split(tmp_path / "one", "b", "train").equals(read_split(tmp_path / "two", "b", "train"))
    for name in ("meta.json", "stats.json", "a/train.parquet", "b/dev.parquet"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f, p: CustomData(path=str(p.with_name("missing.csv"))), "missing.csv not found"),
        (lambda f, p: CustomData(path=str(p.with_suffix(".xlsx"))), "unsupported file type '.xlsx'"),
        (lambda f, p: CustomData(path=str(p), text_column="body"), "has no column 'body'.*text_column"),
        (lambda f, p: CustomData(path=str(p), labels=["neg"]), r"unknown label\(s\) \['pos'\]"),
        (lambda f, p: CustomData(path=str(p), domains=["a", "c"]), r"\['c'\].*available domains: \['a', 'b'\]"),
        (lambda f, p: CustomData(), "data.custom has no data"),
        (lambda f, p: CustomData(path=str(p), train=str(p)), "both path and train"),
        (lambda f, p: _write(f.assign(text=[""] + f["text"].tolist()[1:]), p) and CustomData(path=str(p)),
         "row 0 has an empty 'text'"),
        (lambda f, p: _write(f.assign(label=[""] + f["label"].tolist()[1:]), p) and CustomData(path=str(p)),
         "row 0 has no label"),
        (lambda f, p: _write(f.assign(domain=["bad/name"] * len(f)), p) and CustomData(path=str(p)),
         "not a safe folder name"),
        (lambda f, p: _write(f.iloc[:3], p) and CustomData(path=str(p), domains=["a"]), "cannot be split"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path: Path, change, message: str) -> None:
    frame = _rows({"a": 10, "b": 10})
    path = _write(frame, tmp_path / "d.csv")
    with pytest.raises(HRKDError, match=message) as err:
        build_custom(change(frame, path))
    assert "\n" not in str(err.value)


def test_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(HRKDError, match="not a readable jsonl file"):
        build_custom(CustomData(path=str(tmp_path / "d.jsonl")))
    (tmp_path / "d.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(HRKDError, match="not a readable parquet file"):
        build_custom(CustomData(path=str(tmp_path / "d.parquet")))
