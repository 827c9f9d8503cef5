"""engine.token_cache: a stage reads the tokenised splits an earlier stage wrote, bit for bit what
tokenising gives, and never reads an entry made from other inputs."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import WORDS, make_tokenizer
from hrkd.data import loading
from hrkd.data.format import SPLITS, TaskMeta, make_frame, write_task
from hrkd.data.loading import load_task


def _task(root, extra_word=""):
    rows = {
        "books": ["the cat sat on the mat", "a good book", "the plot was dull", "very fun film"],
        "dvd": ["the dog was not good", "great film", "awful plot" + extra_word, "a very dull film"],
    }
    splits = {d: {s: make_frame([f"{d}-{s}-{i}" for i in range(4)], texts, None, [i % 2 for i in range(4)])
                  for s in SPLITS} for d, texts in rows.items()}
    write_task(root, TaskMeta(task="toy", kind="custom", labels=("neg", "pos"), domains=tuple(rows), text_pair=False,
                              source="test", profile="demo"), splits)
    return root


def _same(a, b):
    return all(all(torch.equal(getattr(a.splits[d][s], f), getattr(b.splits[d][s], f))
                   for f in ("input_ids", "token_type_ids", "lengths", "labels"))
               for d in a.domains for s in a.splits[d])


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = loading.encode_frame
    monkeypatch.setattr(loading, "encode_frame", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_later_load_reads_what_tokenising_gives(tmp_path, counted):
    data, cache, tok = _task(tmp_path / "toy"), tmp_path / "cache", make_tokenizer()
    fresh = load_task(data, tok, 12)
    assert len(counted) == 6 and not cache.exists()  # no cache asked: nothing written
    first = load_task(data, tok, 12, cache=cache)
    assert len(counted) == 12 and len(list(cache.glob("*.pt"))) == 6
    again = load_task(data, tok, 12, cache=cache)
    assert len(counted) == 12  # every split came from the cache
    assert _same(fresh, first) and _same(fresh, again)


def test_other_inputs_never_read_an_entry(tmp_path, counted):
    cache, tok = tmp_path / "cache", make_tokenizer()
    load_task(_task(tmp_path / "a"), tok, 12, cache=cache)
    n = len(counted)
    load_task(_task(tmp_path / "a"), tok, 10, cache=cache)  # another width
    assert len(counted) == n + 6
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *reversed(WORDS)])}
    other = type(tok)(vocab=vocab, do_lower_case=True, model_max_length=16)
    load_task(_task(tmp_path / "a"), other, 12, cache=cache)  # another vocabulary
    assert len(counted) == n + 12
    # One row edited in each dvd split, in another folder: books' files are byte-identical (a hit
    # wherever they live), dvd's three are misses.
    changed = load_task(_task(tmp_path / "b", extra_word=" mat"), tok, 12, cache=cache)
    assert len(counted) == n + 12 + 3
    assert _same(changed, load_task(tmp_path / "b", tok, 12))


def test_an_unreadable_entry_is_recomputed(tmp_path, counted, caplog):
    data, cache, tok = _task(tmp_path / "toy"), tmp_path / "cache", make_tokenizer()
    fresh = load_task(data, tok, 12, cache=cache)
    for entry in cache.glob("*.pt"):
        entry.write_bytes(b"torn")
    with caplog.at_level(logging.WARNING, logger="hrkd.data"):
        again = load_task(data, tok, 12, cache=cache)
    assert len(counted) == 12 and "unreadable token cache entry" in caplog.text
    assert _same(fresh, again)
    load_task(data, tok, 12, cache=cache)
    assert len(counted) == 12  # rewritten: read back next time
