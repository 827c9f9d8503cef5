"""MNLI: the genre split reproduces Table 1 exactly, from GLUE TSVs, multinli jsonl and HF folders."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hrkd.config import MNLI_LABELS, MnliData
from hrkd.data.format import TaskMeta, write_task
from hrkd.data.mnli import build_mnli, read_source, split_genre
from hrkd.errors import HRKDError

# Official train rows per genre and dev_matched rows per genre (the Table 1 test column).
TRAIN_SIZES = {"fiction": 77348, "government": 77350, "slate": 77306, "telephone": 83348, "travel": 77350}
TEST_SIZES = {"fiction": 1973, "government": 1945, "slate": 1955, "telephone": 1966, "travel": 1976}
TABLE1 = {
    "fiction": (69613, 7735, 1973),
    "government": (69615, 7735, 1945),
    "slate": (69575, 7731, 1955),
    "telephone": (75013, 8335, 1966),
    "travel": (69615, 7735, 1976),
}
GOLD = ("entailment", "neutral", "contradiction")
GLUE_TRAIN_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
    "sentence2_parse sentence1 sentence2 label1 gold_label"
).split()


def _rows(sizes: dict[str, int], unlabeled: int, tag: str) -> list[tuple[str, str, str, str, str]]:
    """(pairID, genre, sentence1, sentence2, gold_label) in an interleaved file order.

    Genres are interleaved round-robin like the real files; unlabeled rows and rows of the
    extra genres (oup, letters) sit in between and must not shift any split boundary.
    """
    queues = {g: n for g, n in sizes.items()}
    seen = {g: 0 for g in sizes}
    rows: list[tuple[str, str, str, str, str]] = []
    k = 0
    while any(queues.values()):
        for genre in sizes:
            if not queues[genre]:
                continue
            i = seen[genre]
            s1 = f'{genre} {i} "quoted' if i == 3 else f"{genre} {i}"
            s2 = "n/a" if i == 5 else ("" if i == 6 else f"h{i}")
            rows.append((f"{tag}{k}", genre, s1, s2, GOLD[i % 3]))
            k += 1
            seen[genre] += 1
            queues[genre] -= 1
            if k % 20000 == 0:
                rows.append((f"{tag}{k}", genre, "no majority", "x", "-"))
                rows.append((f"{tag}{k + 1}", "oup", "other genre", "y", "neutral"))
                k += 2
    for j in range(unlabeled):
        rows.append((f"{tag}u{j}", "fiction", "unlabeled", "z", "-"))
    rows.append((f"{tag}L", "letters", "other genre", "w", "entailment"))
    return rows


def _write_glue(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sizes, tag in (("train.tsv", TRAIN_SIZES, "t"), ("dev_matched.tsv", TEST_SIZES, "d")):
        lines = ["\t".join(GLUE_TRAIN_HEADER)]
        for n, (pid, genre, s1, s2, gold) in enumerate(_rows(sizes, 7, tag)):
            lines.append(f"{n}\t{n}\t{pid}\t{genre}\t(\t(\t(\t(\t{s1}\t{s2}\t{gold}\t{gold}")
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_jsonl(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sizes, tag in (
        ("multinli_1.0_train.jsonl", TRAIN_SIZES, "t"),
        ("multinli_1.0_dev_matched.jsonl", TEST_SIZES, "d"),
    ):
        lines = [
            f'{{"annotator_labels": ["{gold}"], "genre": "{genre}", "gold_label": "{gold}", "pairID": "{pid}", '
            f'"sentence1": {json.dumps(s1)}, "sentence2": {json.dumps(s2)}}}'
            for pid, genre, s1, s2, gold in _rows(sizes, 7, tag)
        ]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    _write_glue(root / "MNLI")  # the authors' data_dir/MNLI layout
    return root


def _check_table1(cfg: MnliData) -> dict[str, dict[str, pd.DataFrame]]:
    splits, source = build_mnli(cfg)
    assert source == cfg.source
    assert {g: tuple(len(splits[g][s]) for s in ("train", "dev", "test")) for g in splits} == TABLE1
    return splits


def test_glue_tsv_matches_table1(glue_dir: Path) -> None:
    splits = _check_table1(MnliData(source=str(glue_dir)))
    fiction = splits["fiction"]
    # File order is kept: train is the front, dev the last 10% of the official rows.
    assert fiction["train"]["text"].iloc[0] == "fiction 0"
    assert fiction["train"]["text"].iloc[-1] == "fiction 69612"
    assert fiction["dev"]["text"].iloc[0] == "fiction 69613"
    assert fiction["dev"]["text"].iloc[-1] == "fiction 77347"
    assert fiction["train"]["text"].iloc[3] == 'fiction 3 "quoted'  # quoting disabled
    assert fiction["train"]["text_pair"].iloc[5] == "n/a"  # not turned into NaN
    assert fiction["train"]["text_pair"].iloc[6] == ""
    assert fiction["train"]["label"].iloc[:3].tolist() == [MNLI_LABELS.index(g) for g in GOLD]
    assert fiction["train"]["uid"].iloc[0] == "train:t0"
    assert fiction["test"]["uid"].iloc[0] == "dev_matched:d0"
    assert "unlabeled" not in set(fiction["train"]["text"]) | set(fiction["dev"]["text"])


def test_jsonl_matches_table1_and_glue(tmp_path: Path, glue_dir: Path) -> None:
    _write_jsonl(tmp_path / "multinli_1.0")
    splits = _check_table1(MnliData(source=str(tmp_path)))
    glue = build_mnli(MnliData(source=str(glue_dir), domains=["slate"]))[0]["slate"]
    for split in ("train", "dev", "test"):
        pd.testing.assert_frame_equal(splits["slate"][split], glue[split])


def test_split_uses_exact_decimal_arithmetic() -> None:
    frame = pd.DataFrame({"x": range(77350)})
    train, dev = split_genre(frame, 0.1)
    assert (len(train), len(dev)) == (69615, 7735)
    train, dev = split_genre(pd.DataFrame({"x": range(10)}), 0.25)
    assert (len(train), len(dev)) == (7, 3)


def test_saved_hf_dataset(tmp_path: Path) -> None:
    hf = pytest.importorskip("datasets")
    features = hf.Features(
        {
            "pairID": hf.Value("string"),
            "premise": hf.Value("string"),
            "hypothesis": hf.Value("string"),
            "genre": hf.Value("string"),
            "label": hf.ClassLabel(names=list(GOLD)),
        }
    )

    def part(n: int, tag: str) -> "hf.Dataset":
        genres = ["travel", "fiction"] * n
        labels = [i % 3 for i in range(2 * n)]
        labels[1] = -1  # no gold label in the HF version
        return hf.Dataset.from_dict(
            {
                "pairID": [f"{tag}{i}" for i in range(2 * n)],
                "premise": [f"p{i}" for i in range(2 * n)],
                "hypothesis": [f"h{i}" for i in range(2 * n)],
                "genre": genres,
                "label": labels,
            },
            features=features,
        )

    hf.DatasetDict({"train": part(20, "t"), "validation_matched": part(3, "v")}).save_to_disk(str(tmp_path / "saved"))
    splits, _ = build_mnli(MnliData(source=str(tmp_path / "saved"), domains=["fiction", "travel"]))
    assert {g: [len(splits[g][s]) for s in ("train", "dev", "test")] for g in splits} == {
        "fiction": [17, 2, 2],  # 19 labeled official rows -> floor(19 * 0.9) = 17
        "travel": [18, 2, 3],
    }
    assert splits["travel"]["train"]["uid"].tolist()[:2] == ["train:t0", "train:t2"]
    assert splits["travel"]["train"]["label"].tolist()[:3] == [0, 2, 1]


def test_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    hf = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/multi_nli' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(hf, "load_dataset", offline)
    with pytest.raises(HRKDError, match="could not load MNLI 'nyu-mll/multi_nli'") as err:
        read_source("nyu-mll/multi_nli")
    assert "\n" not in str(err.value) and "save_to_disk" in str(err.value)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(HRKDError, match="not a folder and not a hub dataset id"):
        read_source(str(tmp_path / "nothing" / ".." / "x.tsv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(HRKDError, match="holds neither"):
        read_source(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    header = "genre\tsentence1\tsentence2\tgold_label\n"
    (bad / "train.tsv").write_text(header + "fiction\ta\tb\tmaybe\n", encoding="utf-8")
    (bad / "dev_matched.tsv").write_text(header + "fiction\ta\tb\tneutral\n", encoding="utf-8")
    with pytest.raises(HRKDError, match=r"unknown gold_label \['maybe'\]"):
        read_source(str(bad))
    (bad / "train.tsv").write_text("genre\tpremise\tgold_label\nfiction\ta\tneutral\n", encoding="utf-8")
    with pytest.raises(HRKDError, match=r"no column\(s\) \['sentence1', 'sentence2'\]"):
        read_source(str(bad))
    (bad / "train.tsv").write_text(header + "fiction\ta\tb\tneutral\n", encoding="utf-8")
    with pytest.raises(HRKDError, match="genre 'travel' has no labeled rows"):
        build_mnli(MnliData(source=str(bad), domains=["fiction", "travel"]))
    (bad / "train.tsv").write_text(header + "fiction\t\tb\tneutral\n" * 3, encoding="utf-8")
    splits, _ = build_mnli(MnliData(source=str(bad), domains=["fiction"]))
    meta = TaskMeta("mnli", "mnli", MNLI_LABELS, ("fiction",), True, str(bad), "paper")
    with pytest.raises(HRKDError, match="empty text"):
        write_task(tmp_path / "out", meta, splits)
    assert not (tmp_path / "out").exists()
