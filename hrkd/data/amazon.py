"""Amazon Reviews (Blitzer et al., 2007), four domains, with the exact Table 1 split sizes.

The ``*.review`` files are pseudo-XML (bare ``&``, HTML entities), so the review text is cut
out line by line between ``<review_text>`` and ``</review_text>``, never with an XML parser.
Text is kept verbatim, entities included (see docs/data.md, "Amazon text").
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from hrkd.config import AMAZON_LABELS, AmazonData
from hrkd.data.format import make_frame, stratified_split
from hrkd.errors import HRKDError

log = logging.getLogger("hrkd.data.amazon")

# Folder names inside the archive (kitchen's is the long one).
ARCHIVE_FOLDERS = {
    "books": "books",
    "dvd": "dvd",
    "electronics": "electronics",
    "kitchen": "kitchen_&_housewares",
}
_FIX = "run `dvc update data.dvc` where there is internet, or point data.amazon.source at a local copy"
_CHUNK = 1 << 20


def decode_review(raw: bytes) -> str:
    """Decode one review: UTF-8, else cp1252, else latin-1 (which cannot fail).

    The distributed archive is valid UTF-8 throughout (its only non-ASCII character is
    U+FFFD, already substituted upstream), so the fallbacks exist for other copies of the
    corpus and act per review, never spoiling a whole file.
    """
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def parse_reviews(data: bytes, where: str) -> list[str]:
    """Texts of every ``<review_text>`` block, in file order.

    Lines are stripped and blank lines dropped, then joined with one space, which is how the
    authors' loader builds each example.
    """
    texts: list[str] = []
    current: list[bytes] | None = None
    for number, line in enumerate(data.split(b"\n"), 1):
        stripped = line.strip()
        if stripped == b"<review_text>":
            if current is not None:
                raise HRKDError(f"{where}:{number}: <review_text> opened twice; the file is corrupt, {_FIX}")
            current = []
        elif stripped == b"</review_text>":
            if current is None:
                raise HRKDError(f"{where}:{number}: </review_text> without an opening tag; the file is corrupt, {_FIX}")
            text = decode_review(b" ".join(current))
            if not text:
                raise HRKDError(f"{where}:{number}: review {len(texts)} has an empty text; the file is corrupt, {_FIX}")
            texts.append(text)
            current = None
        elif current is not None and stripped:
            current.append(stripped)
    if current is not None:
        raise HRKDError(f"{where}: file ends inside a <review_text> block (truncated?); {_FIX}")
    if not texts:
        raise HRKDError(f"{where} holds no <review_text> blocks; it is not an Amazon Reviews file, {_FIX}")
    return texts


def _wanted(domains: Iterable[str]) -> dict[tuple[str, str], tuple[str, str]]:
    """(archive folder, file name) -> (domain, label) for every file the task needs."""
    return {(ARCHIVE_FOLDERS[d], f"{label}.review"): (d, label) for d in domains for label in AMAZON_LABELS}


def _missing(found: dict[tuple[str, str], bytes], wanted: dict, where: str) -> None:
    absent = sorted(f"{folder}/{name}" for (folder, name) in wanted if (folder, name) not in found)
    if absent:
        raise HRKDError(f"{where} has no {', '.join(absent[:4])}; it is incomplete, {_FIX}")


def read_archive(path: Path, domains: Iterable[str]) -> dict[tuple[str, str], bytes]:
    """Raw bytes of each needed ``<folder>/<label>.review`` inside a (gzipped) tar archive."""
    wanted = _wanted(domains)
    found: dict[tuple[str, str], bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = member.name.replace("\\", "/").split("/")
                key = tuple(parts[-2:])
                if member.isfile() and len(parts) >= 2 and key in wanted:
                    handle = tar.extractfile(member)
                    found[key] = handle.read() if handle else b""  # type: ignore[assignment]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise HRKDError(f"{path} is not a readable .tar.gz archive ({type(err).__name__}: {err}); {_FIX}") from None
    _missing(found, wanted, str(path))
    return found


def read_folder(path: Path, domains: Iterable[str]) -> dict[tuple[str, str], bytes]:
    """Raw bytes of each needed file in an unpacked archive (with or without sorted_data_acl/)."""
    root = path / "sorted_data_acl" if (path / "sorted_data_acl").is_dir() else path
    wanted = _wanted(domains)
    found = {key: (root / key[0] / key[1]).read_bytes() for key in wanted if (root / key[0] / key[1]).is_file()}
    _missing(found, wanted, str(root))
    return found


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, target: Path) -> None:
    """Fetch ``url`` into ``target`` (a temp path), with a progress bar."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download amazon", leave=False) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise HRKDError(f"could not download {url} ({reason}); {_FIX}") from None


def _check_sha(path: Path, expected: str | None, where: str) -> None:
    if expected and sha256_of(path) != expected.lower():
        raise HRKDError(f"{where} does not match data.amazon.sha256 (corrupt or different file); {_FIX} or fix the sha256")


def read_source(source: str, sha256: str | None, domains: Iterable[str]) -> dict[tuple[str, str], bytes]:
    domains = list(domains)
    if source.startswith(("http://", "https://")):
        with tempfile.TemporaryDirectory(prefix="hrkd-amazon-") as tmp:
            target = Path(tmp) / "archive.tar.gz"
            log.info("downloading %s", source)
            download(source, target)
            _check_sha(target, sha256, source)
            return read_archive(target, domains)
    path = Path(source).expanduser()
    if path.is_dir():
        return read_folder(path, domains)
    if path.is_file():
        _check_sha(path, sha256, str(path))
        return read_archive(path, domains)
    raise HRKDError(f"Amazon source {path} not found; {_FIX}")


def domain_frame(domain: str, files: dict[tuple[str, str], bytes]) -> tuple[list[str], list[str], list[int]]:
    """uids, texts and label ids of one domain, negatives first, in file order."""
    uids: list[str] = []
    texts: list[str] = []
    labels: list[int] = []
    folder = ARCHIVE_FOLDERS[domain]
    for label_id, label in enumerate(AMAZON_LABELS):
        reviews = parse_reviews(files[(folder, f"{label}.review")], f"{folder}/{label}.review")
        uids += [f"{domain}/{label}/{i:04d}" for i in range(len(reviews))]
        texts += reviews
        labels += [label_id] * len(reviews)
    return uids, texts, labels


def build_amazon(cfg: AmazonData) -> tuple[dict[str, dict[str, pd.DataFrame]], str]:
    """Per-domain train/dev/test frames with exactly ``cfg.counts`` rows, and the source."""
    files = read_source(cfg.source, cfg.sha256, cfg.domains)
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for domain in cfg.domains:
        uids, texts, labels = domain_frame(domain, files)
        n_train, n_dev, n_test = cfg.counts[domain]
        if n_train + n_dev + n_test != len(uids):
            raise HRKDError(
                f"data.amazon.counts.{domain} = {[n_train, n_dev, n_test]} adds up to {n_train + n_dev + n_test}, "
                f"but the archive holds {len(uids)} {domain} reviews; make the counts add up to {len(uids)}"
            )
        rows = stratified_split(
            labels, uids, {"train": n_train, "dev": n_dev, "test": n_test}, cfg.split_seed, f"amazon/{domain}"
        )
        out[domain] = {
            split: make_frame([uids[i] for i in idx], [texts[i] for i in idx], None, [labels[i] for i in idx])
            for split, idx in rows.items()
        }
        log.info("amazon/%s: %d train, %d dev, %d test", domain, n_train, n_dev, n_test)
    return out, cfg.source


__all__ = ["ARCHIVE_FOLDERS", "build_amazon", "decode_review", "parse_reviews", "read_archive", "read_source"]
