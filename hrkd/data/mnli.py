"""MNLI as five genre domains (Meta-KD / HRKD protocol, paper section 3.1 and Table 1).

Per genre, the last ``dev_fraction`` of the official training rows (in file order) become dev
and the rest train, exactly like the authors' ``examples[int(0.9 * n):]``; official
dev_matched becomes test. Rows without a gold label are dropped before splitting.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.json as pa_json

from hrkd.config import MNLI_LABELS, MnliData
from hrkd.data.format import exact_fraction, make_frame
from hrkd.errors import HRKDError

log = logging.getLogger("hrkd.data.mnli")

_LABEL_IDS = {name: i for i, name in enumerate(MNLI_LABELS)}
_NO_LABEL = {"-", ""}
_GLUE_FILES = ("train.tsv", "dev_matched.tsv")
_JSONL_FILES = ("multinli_1.0_train.jsonl", "multinli_1.0_dev_matched.jsonl")
_HUB_SPLITS = ("train", "validation_matched")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FIX = "point data.mnli.source at a hub id or a GLUE MNLI / multinli_1.0 / save_to_disk folder"


def _label_ids(values: pd.Series, where: str) -> pd.Series:
    """Map gold-label strings to MNLI_LABELS ids; '-' (no annotator majority) becomes -1."""
    text = values.astype(str).str.strip()
    ids = text.map(_LABEL_IDS)
    unknown = sorted(set(text[ids.isna() & ~text.isin(_NO_LABEL)]))
    if unknown:
        raise HRKDError(f"{where}: unknown gold_label {unknown[:3]}; expected {list(MNLI_LABELS)} or '-'; {_FIX}")
    return ids.fillna(-1).astype("int64")


def _uids(ids: pd.Series | None, n: int, prefix: str) -> list[str]:
    # pairID names the example across every MNLI release; the row number is the fallback.
    if ids is not None and ids.notna().all() and ids.astype(str).is_unique:
        return (prefix + ":" + ids.astype(str)).tolist()
    return [f"{prefix}:{i}" for i in range(n)]


def _raw(uids: list[str], genre: pd.Series, premise: pd.Series, hypothesis: pd.Series, label: pd.Series) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "uid": uids,
            "genre": genre.astype(str).to_numpy(),
            "text": premise.astype(str).to_numpy(),
            "text_pair": hypothesis.astype(str).to_numpy(),
            "label": label.to_numpy(),
        }
    )


def _need(frame: pd.DataFrame, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise HRKDError(f"{where} has no column(s) {missing} (has {list(frame.columns)[:12]}); {_FIX}")


def read_glue_tsv(path: Path, prefix: str) -> pd.DataFrame:
    """Read a GLUE MNLI TSV. Quoting is off: premises contain unbalanced '"' characters."""
    try:
        frame = pd.read_csv(
            path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8"
        )
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise HRKDError(f"{path} is not a readable GLUE MNLI TSV ({str(err).splitlines()[0]}); {_FIX}") from None
    _need(frame, ("genre", "sentence1", "sentence2", "gold_label"), str(path))
    ids = frame["pairID"] if "pairID" in frame.columns else None
    return _raw(
        _uids(ids, len(frame), prefix),
        frame["genre"],
        frame["sentence1"],
        frame["sentence2"],
        _label_ids(frame["gold_label"], str(path)),
    )


def read_multinli_jsonl(path: Path, prefix: str) -> pd.DataFrame:
    """Read an original multinli_1.0 jsonl file, keeping only the fields the task needs."""
    fields = ("pairID", "genre", "sentence1", "sentence2", "gold_label")
    options = pa_json.ParseOptions(
        explicit_schema=pa.schema([(name, pa.string()) for name in fields]), unexpected_field_behavior="ignore"
    )
    try:
        frame = pa_json.read_json(path, parse_options=options).to_pandas()
    except (pa.ArrowInvalid, OSError) as err:
        reason = str(err).splitlines()[0][:200]
        raise HRKDError(f"{path} is not valid MultiNLI JSON lines ({reason}); re-download it or {_FIX}") from None
    for name in ("genre", "sentence1", "gold_label"):
        if frame[name].isna().any():
            raise HRKDError(f"{path}: some rows have no '{name}' field; re-download multinli_1.0 or {_FIX}")
    ids = frame["pairID"] if frame["pairID"].notna().all() else None
    return _raw(
        _uids(ids, len(frame), prefix),
        frame["genre"],
        frame["sentence1"],
        frame["sentence2"].fillna(""),
        _label_ids(frame["gold_label"], str(path)),
    )


def _from_hf(dataset: Any, prefix: str, where: str) -> pd.DataFrame:
    """Convert one split of nyu-mll/multi_nli (premise, hypothesis, genre, label with -1 = none)."""
    missing = [c for c in ("premise", "hypothesis", "genre", "label") if c not in dataset.column_names]
    if missing:
        raise HRKDError(f"{where} has no column(s) {missing} (has {dataset.column_names[:12]}); {_FIX}")
    columns = [c for c in ("pairID", "premise", "hypothesis", "genre", "label") if c in dataset.column_names]
    frame = dataset.select_columns(columns).to_pandas()
    names = getattr(dataset.features["label"], "names", None) or list(MNLI_LABELS)
    if sorted(names) != sorted(MNLI_LABELS):
        raise HRKDError(f"{where}: label names {names} are not MNLI's {list(MNLI_LABELS)}; {_FIX}")
    # Re-map through the names so our ids never depend on the dataset's own label order.
    remap = {i: _LABEL_IDS[name] for i, name in enumerate(names)}
    label = frame["label"].astype("int64").map(lambda v: remap.get(v, -1)).astype("int64")
    ids = frame["pairID"] if "pairID" in frame.columns else None
    return _raw(_uids(ids, len(frame), prefix), frame["genre"], frame["premise"], frame["hypothesis"].fillna(""), label)


def _from_dataset_dict(data: Any, where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    missing = [s for s in _HUB_SPLITS if s not in data]
    if missing:
        raise HRKDError(f"{where} has no split(s) {missing} (has {sorted(data)}); {_FIX}")
    return _from_hf(data["train"], "train", where), _from_hf(data["validation_matched"], "dev_matched", where)


def _find_folder(root: Path, names: tuple[str, ...]) -> Path | None:
    # Accept the files directly in the folder or in the layouts GLUE and NYU ship them in.
    for folder in (root, root / "MNLI", root / "multinli_1.0"):
        if all((folder / name).is_file() for name in names):
            return folder
    return None


def read_source(source: str, revision: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (official train, official dev_matched) with columns uid, genre, text, text_pair, label."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (folder := _find_folder(path, _GLUE_FILES)) is not None:
            log.info("reading GLUE MNLI TSVs from %s", folder)
            return read_glue_tsv(folder / _GLUE_FILES[0], "train"), read_glue_tsv(folder / _GLUE_FILES[1], "dev_matched")
        if (folder := _find_folder(path, _JSONL_FILES)) is not None:
            log.info("reading multinli_1.0 jsonl from %s", folder)
            return (
                read_multinli_jsonl(folder / _JSONL_FILES[0], "train"),
                read_multinli_jsonl(folder / _JSONL_FILES[1], "dev_matched"),
            )
        if (path / "dataset_dict.json").is_file():
            import datasets as hf_datasets  # heavy import, only for this source

            log.info("reading a saved HF dataset from %s", path)
            try:
                data = hf_datasets.load_from_disk(str(path))
            except Exception as err:  # noqa: BLE001 - any failure here is a bad folder
                raise HRKDError(f"{path} is not a readable save_to_disk folder ({type(err).__name__}); {_FIX}") from None
            return _from_dataset_dict(data, str(path))
        raise HRKDError(
            f"{path} holds neither {list(_GLUE_FILES)}, {list(_JSONL_FILES)} nor a save_to_disk dataset; {_FIX}"
        )
    if path.exists() or not _HUB_ID.match(source):
        raise HRKDError(f"MNLI source '{source}' is not a folder and not a hub dataset id; {_FIX}")
    import datasets as hf_datasets  # heavy import, only for this source

    log.info("loading %s (revision %s) from the HF hub", source, revision or "default")
    try:
        data = hf_datasets.load_dataset(source, revision=revision)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, bad revision: all user-fixable
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise HRKDError(
            f"could not load MNLI '{source}' from the hub ({type(err).__name__}: {reason}); "
            f"run where the hub is reachable or {_FIX}"
        ) from None
    return _from_dataset_dict(data, source)


def genre_frame(raw: pd.DataFrame, genre: str) -> pd.DataFrame:
    """Labeled rows of one genre, in file order, in the on-disk column layout."""
    rows = raw[(raw["genre"] == genre) & (raw["label"] >= 0)]
    return make_frame(rows["uid"].tolist(), rows["text"].tolist(), rows["text_pair"].tolist(), rows["label"].tolist())


def split_genre(train_rows: pd.DataFrame, dev_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Front floor(n * (1 - f)) rows train, the rest dev, with f taken as the decimal written."""
    n_train = math.floor(len(train_rows) * (1 - exact_fraction(dev_fraction)))
    return train_rows.iloc[:n_train].reset_index(drop=True), train_rows.iloc[n_train:].reset_index(drop=True)


def build_mnli(cfg: MnliData) -> tuple[dict[str, dict[str, pd.DataFrame]], str]:
    """Per-genre train/dev/test frames and a description of the source."""
    train_raw, test_raw = read_source(cfg.source, cfg.revision)
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for genre in cfg.domains:
        official = genre_frame(train_raw, genre)
        test = genre_frame(test_raw, genre)
        if official.empty or test.empty:
            found = sorted(set(train_raw["genre"]))
            raise HRKDError(
                f"MNLI genre '{genre}' has no labeled rows in '{cfg.source}' (genres there: {found}); "
                "fix data.mnli.domains"
            )
        train, dev = split_genre(official, cfg.dev_fraction)
        out[genre] = {"train": train, "dev": dev, "test": test}
        log.info("mnli/%s: %d train, %d dev, %d test", genre, len(train), len(dev), len(test))
    source = cfg.source if cfg.revision is None else f"{cfg.source}@{cfg.revision}"
    return out, source
