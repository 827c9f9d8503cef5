"""The on-disk task format every downstream stage reads, plus the deterministic split helpers.

A prepared task is one folder::

    meta.json                     TaskMeta (labels, domains, provenance)
    stats.json                    per-domain split sizes and label counts (Table 1)
    <domain>/{train,dev,test}.parquet   columns uid, text, text_pair, label

Parquet files are written from an explicit Arrow schema with fixed writer options and no
pandas metadata, and JSON through :func:`hrkd.io.write_json`, so a rerun on the same input
gives byte-identical files and DVC sees no change.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hrkd.config import PROFILES
from hrkd.errors import HRKDError
from hrkd.io import atomic_dir, read_json, write_json

log = logging.getLogger("hrkd.data.format")

SPLITS = ("train", "dev", "test")
KINDS = ("mnli", "amazon", "custom")
COLUMNS = ("uid", "text", "text_pair", "label")
SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("text_pair", pa.string(), nullable=True),
        pa.field("label", pa.int64(), nullable=False),
    ]
)
# Fixed writer options: anything left to library defaults could change bytes between versions.
_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "row_group_size": 1 << 20,
    "data_page_version": "1.0",
    "version": "2.6",
}
# Domain names become directory names, so keep them to a portable, unambiguous alphabet.
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class TaskMeta:
    """Contents of ``meta.json``: what the label ids and domain folders mean."""

    task: str
    kind: str
    labels: tuple[str, ...]
    domains: tuple[str, ...]
    text_pair: bool
    source: str
    profile: str
    fewshot_rate: float | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "domains", tuple(self.domains))
        if self.kind not in KINDS:
            raise HRKDError(f"meta.json: unknown kind '{self.kind}'; expected one of {list(KINDS)}")
        if self.profile not in PROFILES:
            raise HRKDError(f"meta.json: unknown profile '{self.profile}'; expected one of {list(PROFILES)}")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise HRKDError(f"task '{self.task}' needs at least two distinct labels, got {list(self.labels)}")
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise HRKDError(f"task '{self.task}' needs distinct domain names, got {list(self.domains)}")
        for domain in self.domains:
            check_domain_name(domain)
        if self.fewshot_rate is not None and not 0.0 < self.fewshot_rate <= 1.0:
            raise HRKDError(f"fewshot_rate {self.fewshot_rate} is outside (0, 1]; use a rate such as 0.02")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["domains"] = list(self.domains)
        if self.fewshot_rate is None:
            del data["fewshot_rate"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "meta.json") -> "TaskMeta":
        names = {"task", "kind", "labels", "domains", "text_pair", "source", "profile"}
        missing = sorted(names - set(data))
        extra = sorted(set(data) - names - {"fewshot_rate"})
        if missing or extra:
            raise HRKDError(
                f"{where}: missing keys {missing} / unexpected keys {extra}; rerun the prepare stage to rewrite it"
            )
        return cls(**{key: data[key] for key in data})


def check_domain_name(name: str) -> str:
    """Return ``name`` if it is a safe folder name (letters, digits, ``_ . -``), else raise."""
    if not isinstance(name, str) or not _DOMAIN_RE.match(name):
        raise HRKDError(
            f"domain name {name!r} is not a safe folder name; use letters, digits, '_', '.' or '-' "
            "(at most 64 characters, starting with a letter or digit)"
        )
    return name


def read_meta(task_dir: str | Path) -> TaskMeta:
    path = Path(task_dir) / "meta.json"
    if not path.is_file():
        raise HRKDError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    try:
        data = read_json(path)
    except (ValueError, OSError) as err:
        raise HRKDError(f"{path} is not readable JSON ({err}); rerun the prepare stage") from None
    if not isinstance(data, dict):
        raise HRKDError(f"{path} must hold a JSON object; rerun the prepare stage")
    return TaskMeta.from_json(data, str(path))


def read_stats(task_dir: str | Path) -> dict[str, Any]:
    path = Path(task_dir) / "stats.json"
    if not path.is_file():
        raise HRKDError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return read_json(path)


def read_split(task_dir: str | Path, domain: str, split: str) -> pd.DataFrame:
    """Load one split of one domain, checking it still follows the format contract."""
    if split not in SPLITS:
        raise HRKDError(f"unknown split '{split}'; expected one of {list(SPLITS)}")
    path = Path(task_dir) / check_domain_name(domain) / f"{split}.parquet"
    if not path.is_file():
        raise HRKDError(f"{path} not found: check the domain name or rerun the prepare stage")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise HRKDError(f"{path} is not a readable parquet file ({err}); rerun the prepare stage") from None
    if tuple(table.column_names) != COLUMNS:
        raise HRKDError(f"{path} has columns {table.column_names}, expected {list(COLUMNS)}; rerun the prepare stage")
    for name in COLUMNS:
        expected = SCHEMA.field(name).type
        if not table.schema.field(name).type.equals(expected):
            raise HRKDError(
                f"{path}: column '{name}' has type {table.schema.field(name).type}, expected {expected}; "
                "rerun the prepare stage"
            )
    return table.to_pandas()


def check_frame(frame: pd.DataFrame, n_labels: int, where: str, text_pair: bool) -> pd.DataFrame:
    """Validate one split and return it with exactly the contract's columns and dtypes."""
    if list(frame.columns) != list(COLUMNS):
        raise HRKDError(f"{where}: columns {list(frame.columns)}, expected {list(COLUMNS)}")
    if frame["uid"].isna().any() or not frame["uid"].is_unique:
        raise HRKDError(f"{where}: uid values must be present and unique")
    bad_text = frame["text"].isna() | (frame["text"].astype("string").str.len() == 0)
    if bad_text.any():
        uid = frame.loc[bad_text, "uid"].iloc[0]
        raise HRKDError(f"{where}: row '{uid}' has an empty text; remove it or fill it in")
    pair_missing = frame["text_pair"].isna()
    if text_pair and pair_missing.any():
        raise HRKDError(f"{where}: text_pair is missing for some rows of a sentence-pair task; fix the source data")
    if not text_pair and not pair_missing.all():
        raise HRKDError(f"{where}: text_pair is set but the task is single-sentence; fix the source data")
    labels = pd.to_numeric(frame["label"], errors="coerce")
    if labels.isna().any() or (labels < 0).any() or (labels >= n_labels).any():
        raise HRKDError(f"{where}: labels must be ids in [0, {n_labels}); fix the label mapping")
    return frame


def _to_table(frame: pd.DataFrame) -> pa.Table:
    arrays = [
        pa.array(frame["uid"].astype(str).tolist(), type=pa.string()),
        pa.array(frame["text"].astype(str).tolist(), type=pa.string()),
        pa.array([None if pd.isna(v) else str(v) for v in frame["text_pair"].tolist()], type=pa.string()),
        pa.array(frame["label"].astype("int64").tolist(), type=pa.int64()),
    ]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    pq.write_table(_to_table(frame), path, **_PARQUET_OPTIONS)


def split_stats(meta: TaskMeta, splits: Mapping[str, Mapping[str, pd.DataFrame]]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for domain in meta.domains:
        entry: dict[str, Any] = {"label_counts": {}}
        for split in SPLITS:
            frame = splits[domain][split]
            counts = frame["label"].astype("int64").value_counts()
            entry[split] = int(len(frame))
            entry["label_counts"][split] = {name: int(counts.get(i, 0)) for i, name in enumerate(meta.labels)}
        stats[domain] = entry
    return stats


def write_task(
    out_dir: str | Path, meta: TaskMeta, splits: Mapping[str, Mapping[str, pd.DataFrame]]
) -> dict[str, Any]:
    """Validate and write a whole task (meta, stats, every parquet) atomically; return the stats."""
    out_dir = Path(out_dir)
    if set(splits) != set(meta.domains):
        raise HRKDError(f"task '{meta.task}': data for domains {sorted(splits)} but meta lists {list(meta.domains)}")
    for domain in meta.domains:
        if set(splits[domain]) != set(SPLITS):
            raise HRKDError(f"task '{meta.task}', domain '{domain}': need splits {list(SPLITS)}, got {sorted(splits[domain])}")
        for split in SPLITS:
            check_frame(splits[domain][split], len(meta.labels), f"{meta.task}/{domain}/{split}", meta.text_pair)
    stats = split_stats(meta, splits)
    with atomic_dir(out_dir) as tmp:
        for domain in meta.domains:
            (tmp / domain).mkdir()
            for split in SPLITS:
                write_parquet(tmp / domain / f"{split}.parquet", splits[domain][split])
        write_json(tmp / "meta.json", meta.to_json())
        write_json(tmp / "stats.json", stats)
    log.debug("wrote task '%s' (%d domains) to %s", meta.task, len(meta.domains), out_dir)
    return stats


def make_frame(
    uids: Sequence[str], texts: Sequence[str], pairs: Sequence[str | None] | None, labels: Sequence[int]
) -> pd.DataFrame:
    """Build a split in the contract's column order (``pairs=None`` for single-sentence tasks)."""
    return pd.DataFrame(
        {
            "uid": list(uids),
            "text": list(texts),
            "text_pair": list(pairs) if pairs is not None else [None] * len(uids),
            "label": pd.array(list(labels), dtype="int64"),
        },
        columns=list(COLUMNS),
    )


# --- deterministic splitting, shared by the Amazon and custom sources ------------------------


def exact_fraction(value: float) -> Fraction:
    """The decimal a user wrote (0.1 -> 1/10), not the binary float nearest to it."""
    return Fraction(repr(float(value)))


def keyed_order(keys: Sequence[str], seed: int, salt: str) -> list[int]:
    """A seeded permutation of ``range(len(keys))`` that depends only on the keys, not the library.

    Each row is ranked by sha256(seed, salt, key), so the order never changes with numpy's or
    Python's RNG implementations and a row keeps its place when unrelated rows are added.
    """
    def rank(i: int) -> tuple[bytes, int]:
        return hashlib.sha256(f"{seed}\x1f{salt}\x1f{keys[i]}".encode()).digest(), i

    return sorted(range(len(keys)), key=rank)


def apportion(total: int, pools: Sequence[int]) -> list[int]:
    """Split ``total`` across ``pools`` proportionally (largest remainder, ties to the lower index).

    Never gives a pool more than it holds, so callers can apportion split after split from
    what is left and every split ends up as label-balanced as the counts allow.
    """
    size = sum(pools)
    if total > size:
        raise HRKDError(f"cannot take {total} rows from {size}; lower the requested split sizes")
    if size == 0:
        return [0] * len(pools)
    quotas = [Fraction(total * pool, size) for pool in pools]
    shares = [int(q) for q in quotas]
    order = sorted(range(len(pools)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def stratified_split(
    labels: Sequence[int], keys: Sequence[str], sizes: Mapping[str, int], seed: int, salt: str
) -> dict[str, list[int]]:
    """Row indices per split with exactly ``sizes[split]`` rows, stratified by label.

    Splits are apportioned in the order test, dev, train, each from the rows still unassigned,
    so an odd count's extra row alternates between labels. Within a label the rows are taken
    in seeded key order; within a split the rows are shuffled again so the front of train
    (what few-shot keeps) mixes the labels.
    """
    if sum(sizes.values()) != len(labels):
        raise HRKDError(f"split sizes {dict(sizes)} add up to {sum(sizes.values())}, but there are {len(labels)} rows")
    classes = sorted(set(labels))
    order = keyed_order(keys, seed, salt)
    by_label = {c: [i for i in order if labels[i] == c] for c in classes}
    left = {c: list(rows) for c, rows in by_label.items()}
    picked: dict[str, list[int]] = {}
    for split in ("test", "dev", "train"):
        if split not in sizes:
            continue
        shares = apportion(sizes[split], [len(left[c]) for c in classes])
        rows: list[int] = []
        for c, share in zip(classes, shares):
            rows += left[c][:share]
            left[c] = left[c][share:]
        shuffle = keyed_order([keys[i] for i in rows], seed, f"{salt}/{split}")
        picked[split] = [rows[i] for i in shuffle]
    return {split: picked[split] for split in sizes}
