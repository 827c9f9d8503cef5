"""Amazon Reviews: the real archive gives the exact Table 1 splits, text survives verbatim."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hrkd.config import AmazonData, parse_params
from hrkd.data.amazon import build_amazon, decode_review, parse_reviews, read_source
from hrkd.data.format import read_meta, read_split, read_stats
from hrkd.data.prepare import prepare_task
from hrkd.errors import HRKDError
from helpers import tree_bytes

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon" / "domain_sentiment_data.tar.gz"
COUNTS = {"books": (1631, 170, 199), "dvd": (1621, 194, 185), "electronics": (1615, 172, 213), "kitchen": (1613, 184, 203)}
needs_archive = pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"real archive not at {ARCHIVE}")


def _params(source: str, **amazon: object):
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["profile"] = "paper"
    raw["data"]["amazon"].update(source=source, counts={d: list(c) for d, c in COUNTS.items()}, **amazon)
    return parse_params(raw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("amazon") / "prepared"
    prepare_task(_params(str(ARCHIVE)), "amazon", out)
    return out


@needs_archive
def test_real_archive_exact_counts_and_labels(prepared: Path) -> None:
    meta = read_meta(prepared)
    assert (meta.kind, meta.labels, meta.domains, meta.text_pair) == (
        "amazon", ("negative", "positive"), ("books", "dvd", "electronics", "kitchen"), False
    )
    stats = read_stats(prepared)
    assert {d: (stats[d]["train"], stats[d]["dev"], stats[d]["test"]) for d in stats} == COUNTS
    # Each split is as label-balanced as its count allows (odd counts: the extra row alternates).
    assert stats["books"]["label_counts"] == {
        "train": {"negative": 815, "positive": 816},
        "dev": {"negative": 85, "positive": 85},
        "test": {"negative": 100, "positive": 99},
    }
    assert stats["dvd"]["label_counts"]["dev"] == {"negative": 97, "positive": 97}
    assert stats["dvd"]["label_counts"]["test"] == {"negative": 93, "positive": 92}
    for domain in COUNTS:
        uids: list[str] = []
        for split in ("train", "dev", "test"):
            frame = read_split(prepared, domain, split)
            assert set(frame["label"]) == {0, 1}
            assert frame["text"].str.strip().str.len().min() > 0
            assert frame["text_pair"].isna().all()
            uids += frame["uid"].tolist()
        assert len(set(uids)) == 2000
        assert {u.rsplit("/", 1)[0] for u in uids} == {f"{domain}/negative", f"{domain}/positive"}
    train = read_split(prepared, "kitchen", "train")
    assert set(train["label"].iloc[:10]) == {0, 1}  # few-shot takes the front: it must be mixed


@needs_archive
def test_real_archive_text_is_verbatim(prepared: Path) -> None:
    frames = [read_split(prepared, "books", s) for s in ("train", "dev", "test")]
    texts = {u: t for f in frames for u, t in zip(f["uid"], f["text"])}
    labels = {u: l for f in frames for u, l in zip(f["uid"], f["label"])}
    hit = [u for u, t in texts.items() if "Truth &amp; Beauty!" in t]
    assert len(hit) == 1 and hit[0].startswith("books/negative/") and labels[hit[0]] == 0
    assert sum("&quot;" in t for t in texts.values()) > 50
    assert any(" & " in t for t in texts.values())
    assert not any("\n" in t or t != t.strip() for t in texts.values())
    first = texts["books/positive/0000"]
    assert first.startswith("Sphere by Michael Crichton is an excellant novel.")
    assert "I have read. The story revolves" in first  # paragraphs joined with one space
    assert "is boring and clich\ufffdd" in texts["books/negative/0239"]  # U+FFFD as in the release


@needs_archive
def test_real_archive_is_deterministic(prepared: Path, tmp_path: Path) -> None:
    prepare_task(_params(str(ARCHIVE)), "amazon", tmp_path / "again")
    assert tree_bytes(prepared) == tree_bytes(tmp_path / "again")
    prepare_task(_params(str(ARCHIVE), split_seed=7), "amazon", tmp_path / "other")
    assert tree_bytes(tmp_path / "other")["books/train.parquet"] != tree_bytes(prepared)["books/train.parquet"]


@needs_archive
def test_truncated_archive_is_one_line_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(ARCHIVE.read_bytes()[: ARCHIVE.stat().st_size // 2])
    with pytest.raises(HRKDError, match="not a readable .tar.gz archive") as err:
        prepare_task(_params(str(broken)), "amazon", tmp_path / "out")
    assert "\n" not in str(err.value) and "dvc update data.dvc" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.tar.gz"]


def _review_block(text: bytes) -> bytes:
    return b"<review>\n<title>\nt & c\n</title>\n<review_text>\n" + text + b"\n</review_text>\n</review>\n"


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _small_corpus(n: int = 5) -> dict[str, bytes]:
    files = {}
    for folder in ("books", "dvd", "electronics", "kitchen_&_housewares"):
        for label in ("negative", "positive"):
            body = b"".join(_review_block(f"{folder} {label} {i} AT&T &lt;3".encode()) for i in range(n))
            files[f"sorted_data_acl/{folder}/{label}.review"] = body
    return files


SMALL_COUNTS = {d: (6, 2, 2) for d in ("books", "dvd", "electronics", "kitchen")}


def test_tar_missing_domain_is_one_line_error(tmp_path: Path) -> None:
    files = {k: v for k, v in _small_corpus().items() if "kitchen" not in k}
    _tar(tmp_path / "a.tar.gz", files)
    with pytest.raises(HRKDError, match=r"has no kitchen_&_housewares/negative.review") as err:
        build_amazon(AmazonData(source=str(tmp_path / "a.tar.gz"), counts=SMALL_COUNTS))
    assert "\n" not in str(err.value)
    # Without kitchen in the task the same archive is fine.
    splits, _ = build_amazon(AmazonData(source=str(tmp_path / "a.tar.gz"), domains=["dvd"], counts=SMALL_COUNTS))
    assert [len(splits["dvd"][s]) for s in ("train", "dev", "test")] == [6, 2, 2]


def test_unpacked_folder_with_or_without_sorted_data_acl(tmp_path: Path) -> None:
    for root, prefix in ((tmp_path / "a", ""), (tmp_path / "b", "sorted_data_acl/")):
        for name, data in _small_corpus().items():
            target = root / name.replace("sorted_data_acl/", prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    one, _ = build_amazon(AmazonData(source=str(tmp_path / "a"), counts=SMALL_COUNTS))
    two, _ = build_amazon(AmazonData(source=str(tmp_path / "b"), counts=SMALL_COUNTS))
    assert one["kitchen"]["test"].equals(two["kitchen"]["test"])
    texts = sorted(t for s in one["kitchen"].values() for t in s["text"])
    assert texts[0] == "kitchen_&_housewares negative 0 AT&T &lt;3"

def test_counts_must_cover_the_reviews(tmp_path: Path) -> None:
    _tar(tmp_path / "a.tar.gz", _small_corpus())
    with pytest.raises(HRKDError, match=r"counts.books = \[6, 2, 1\] adds up to 9, but the archive holds 10"):
        build_amazon(AmazonData(source=str(tmp_path / "a.tar.gz"), counts={**SMALL_COUNTS, "books": (6, 2, 1)}))


def test_decoding_and_parsing_rules() -> None:
    assert decode_review("café".encode("utf-8")) == "café"
    assert decode_review(b"caf\xe9 \x93quoted\x94") == "café \u201cquoted\u201d"  # cp1252
    assert decode_review(b"\x81") == "\x81"  # undefined in cp1252 -> latin-1
    data = _review_block(b"  one &amp; two  \n\n  three & four ") + _review_block(b"caf\xe9")
    assert parse_reviews(data, "x") == ["one &amp; two three & four", "café"]
    with pytest.raises(HRKDError, match="ends inside a <review_text>"):
        parse_reviews(b"<review_text>\nabc\n", "x.review")
    with pytest.raises(HRKDError, match="no <review_text> blocks"):
        parse_reviews(b"<html></html>", "x.review")
    with pytest.raises(HRKDError, match="empty text"):
        parse_reviews(b"<review_text>\n\n</review_text>\n", "x.review")


def test_missing_source_and_sha_mismatch(tmp_path: Path) -> None:
    with pytest.raises(HRKDError, match="not found; run `dvc update data.dvc`"):
        read_source(str(tmp_path / "nope.tar.gz"), None, ["books"])
    _tar(tmp_path / "a.tar.gz", _small_corpus())
    with pytest.raises(HRKDError, match="does not match data.amazon.sha256"):
        read_source(str(tmp_path / "a.tar.gz"), "0" * 64, ["books"])
    (tmp_path / "plain.gz").write_bytes(gzip.compress(b"not a tar"))
    with pytest.raises(HRKDError, match="not a readable .tar.gz archive"):
        read_source(str(tmp_path / "plain.gz"), None, ["books"])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    _tar(tmp_path / "a.tar.gz", _small_corpus())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args) -> None:  # keep test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_with_sha256(server: str, tmp_path: Path) -> None:
    url = f"{server}/a.tar.gz"
    sha = hashlib.sha256((tmp_path / "a.tar.gz").read_bytes()).hexdigest()
    splits, source = build_amazon(AmazonData(source=url, sha256=sha, counts=SMALL_COUNTS))
    assert source == url and len(splits["electronics"]["train"]) == 6
    with pytest.raises(HRKDError, match="does not match data.amazon.sha256"):
        read_source(url, "f" * 64, ["books"])
    with pytest.raises(HRKDError, match=r"could not download .*missing.tar.gz.*dvc update data.dvc") as err:
        read_source(f"{server}/missing.tar.gz", None, ["books"])
    assert "\n" not in str(err.value)


@needs_archive
def test_row_caps_keep_the_first_rows_of_the_full_split(prepared: Path, tmp_path: Path) -> None:
    """data.amazon.max_rows cuts each split after the full seeded split: the rows kept are the
    first rows of the uncapped split, dev/test caps do not move train rows, and labels stay mixed."""
    out = tmp_path / "capped"
    prepare_task(_params(str(ARCHIVE), max_rows={"train": 40, "dev": 10, "test": None}), "amazon", out)
    stats = read_stats(out)
    assert {d: (stats[d]["train"], stats[d]["dev"], stats[d]["test"]) for d in stats} == {
        d: (40, 10, c[2]) for d, c in COUNTS.items()}
    for domain in COUNTS:
        full = read_split(prepared, domain, "train")
        capped = read_split(out, domain, "train")
        assert capped["uid"].tolist() == full["uid"].tolist()[:40]
        assert read_split(out, domain, "test")["uid"].tolist() == read_split(prepared, domain, "test")["uid"].tolist()
        assert 10 <= int(capped["label"].sum()) <= 30  # the front of train mixes both labels


def test_row_caps_must_be_positive() -> None:
    with pytest.raises(HRKDError, match=r"invalid 'data.amazon.max_rows.train'.*-S data.amazon.max_rows.train="):
        _params("x.tar.gz", max_rows={"train": 0})
