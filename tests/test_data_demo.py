"""The generated demo corpus: exact sizes, determinism, and the signal it is designed to carry."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from hrkd.config import AMAZON_DOMAINS, AMAZON_LABELS, MNLI_DOMAINS, MNLI_LABELS, DemoSizes, parse_params
from hrkd.data.demo import AMAZON_SHARED_CUES, MNLI_SHARED_CUES, build_demo, domain_words
from hrkd.data.format import read_meta, read_stats
from hrkd.data.prepare import prepare_task

REPO = Path(__file__).resolve().parents[1]
MNLI_SIZES = DemoSizes(train=480, dev=80, test=120)
AMAZON_SIZES = DemoSizes(train=320, dev=60, test=100)
SEED = 1234


@pytest.fixture(scope="module")
def mnli() -> dict[str, dict[str, pd.DataFrame]]:
    return build_demo("mnli", MNLI_DOMAINS, MNLI_SIZES, SEED)[0]


@pytest.fixture(scope="module")
def amazon() -> dict[str, dict[str, pd.DataFrame]]:
    return build_demo("amazon", AMAZON_DOMAINS, AMAZON_SIZES, SEED)[0]


def _sizes(data: dict[str, dict[str, pd.DataFrame]]) -> dict[str, tuple[int, int, int]]:
    return {d: tuple(len(data[d][s]) for s in ("train", "dev", "test")) for d in data}


def test_sizes_follow_table1_proportions(mnli, amazon) -> None:
    # train/dev scaled by each domain's share of Table 1's train sizes (telephone is larger), test equal.
    assert _sizes(mnli) == {
        "fiction": (473, 79, 120),
        "government": (473, 79, 120),
        "slate": (472, 79, 120),
        "telephone": (509, 85, 120),
        "travel": (473, 79, 120),
    }
    assert _sizes(amazon) == {
        "books": (322, 60, 100),
        "dvd": (320, 60, 100),
        "electronics": (319, 60, 100),
        "kitchen": (319, 60, 100),
    }


def test_shapes_labels_and_uids(mnli, amazon) -> None:
    labels, pair = build_demo("amazon", ["dvd"], AMAZON_SIZES, SEED)[1:]
    assert (labels, pair) == (AMAZON_LABELS, False)
    assert build_demo("mnli", ["slate"], MNLI_SIZES, SEED)[1:] == (MNLI_LABELS, True)
    for data, n_labels, has_pair in ((mnli, 3, True), (amazon, 2, False)):
        for domain, parts in data.items():
            for split, frame in parts.items():
                assert list(frame.columns) == ["uid", "text", "text_pair", "label"]
                assert frame["uid"].iloc[0] == f"demo/{domain}/{split}/00000"
                assert frame["text_pair"].notna().all() if has_pair else frame["text_pair"].isna().all()
                assert set(frame["label"]) == set(range(n_labels))
                assert (frame["text"].str.len() > 0).all()


def test_deterministic_and_independent_of_other_domains(mnli) -> None:
    again = build_demo("mnli", MNLI_DOMAINS, MNLI_SIZES, SEED)[0]
    alone = build_demo("mnli", ["telephone"], MNLI_SIZES, SEED)[0]
    other = build_demo("mnli", ["telephone"], MNLI_SIZES, SEED + 1)[0]
    for split in ("train", "dev", "test"):
        pd.testing.assert_frame_equal(again["fiction"][split], mnli["fiction"][split])
        pd.testing.assert_frame_equal(alone["telephone"][split], mnli["telephone"][split])
        assert other["telephone"][split]["text"].tolist() != mnli["telephone"][split]["text"].tolist()


def test_vocabulary_is_small_and_plain(mnli, amazon) -> None:
    words: Counter[str] = Counter()
    for data in (mnli, amazon):
        for parts in data.values():
            for frame in parts.values():
                for column in ("text", "text_pair"):
                    for text in frame[column].dropna():
                        words.update(text.split())
    assert 300 <= len(words) <= 600  # a WordPiece vocab of ~1500 covers it whole
    assert all(re.fullmatch(r"[a-z]+|\.", w) for w in words)


def test_label_noise_and_class_balance(amazon) -> None:
    # Labels are drawn balanced and ~10% are then flipped: counts stay near n / 2.
    counts = Counter(int(v) for parts in amazon.values() for v in parts["train"]["label"])
    assert abs(counts[0] - counts[1]) < 0.1 * sum(counts.values())


def _label_share(data, domain: str, words: set[str], label: int) -> float:
    """Share of the domain's texts containing one of ``words`` that carry ``label``."""
    frame = pd.concat(data[domain].values())
    has = frame["text"].str.split().apply(lambda ws: bool(words & set(ws)))
    return float((frame.loc[has, "label"] == label).mean())


def test_shared_cues_agree_and_flip_words_disagree_across_domains(amazon) -> None:
    for domain in AMAZON_DOMAINS:
        for label, cues in enumerate(AMAZON_SHARED_CUES):
            assert _label_share(amazon, domain, set(cues), label) > 0.6  # distractors and noise dilute it
    # "unpredictable" is positive for books (like a plot) and negative elsewhere (like a kettle).
    assert domain_words("amazon", "books").flips[1] == ("unpredictable", "long", "light")
    assert _label_share(amazon, "books", {"unpredictable"}, 1) > 0.7
    assert _label_share(amazon, "kitchen", {"unpredictable"}, 0) > 0.7
    assert domain_words("amazon", "kitchen").domain_cues[0] == ("flimsy", "rusted", "leaks", "dented")


def test_entailed_hypotheses_copy_the_premise(mnli) -> None:
    frame = pd.concat(mnli["government"].values())
    cues = {w for label in MNLI_SHARED_CUES for w in label}
    topics = set(domain_words("mnli", "government").topics)

    def overlap(row) -> float:
        hyp = [w for w in row["text_pair"].split() if w in topics and w not in cues]
        return sum(w in row["text"].split() for w in hyp) / max(1, len(hyp))

    share = frame.apply(overlap, axis=1).groupby(frame["label"]).mean()
    assert share[0] > 0.9 and share[2] > 0.9 and share[1] < 0.7


def test_prepare_task_writes_the_demo_corpus(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw.update(profile="demo", demo={"seed": SEED, "mnli": MNLI_SIZES.model_dump(), "amazon": AMAZON_SIZES.model_dump()})
    raw["data"]["amazon"]["source"] = str(tmp_path / "never-read.tar.gz")  # demo ignores the archive
    params = parse_params(raw)
    prepare_task(params, "amazon", tmp_path / "amazon")
    meta = read_meta(tmp_path / "amazon")
    assert (meta.kind, meta.source, meta.profile, meta.labels, meta.domains) == (
        "amazon", "demo", "demo", AMAZON_LABELS, AMAZON_DOMAINS
    )
    assert read_stats(tmp_path / "amazon")["dvd"]["train"] == 320


# --- learnability: a bag-of-words logistic regression, pooled vs single-domain ---------------


def _docs(frame: pd.DataFrame) -> list[list[str]]:
    # Premise and hypothesis words are separate features, as a pair model can tell them apart.
    pairs = frame["text_pair"].tolist()
    return [
        [f"p:{w}" for w in text.split()] + ([f"h:{w}" for w in pair.split()] if isinstance(pair, str) else [])
        for text, pair in zip(frame["text"], pairs)
    ]


def _bow(docs: list[list[str]], vocab: dict[str, int]) -> torch.Tensor:
    x = torch.zeros(len(docs), len(vocab))
    for i, doc in enumerate(docs):
        for w in doc:
            if w in vocab:
                x[i, vocab[w]] = 1.0
    return x


def _fit(x: torch.Tensor, y: torch.Tensor, n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], n_labels, requires_grad=True)
    b = torch.zeros(n_labels, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _accuracies(data, n_labels: int) -> tuple[dict[str, float], dict[str, float]]:
    torch.manual_seed(0)
    vocab: dict[str, int] = {}
    for parts in data.values():
        for doc in _docs(parts["train"]):
            for w in doc:
                vocab.setdefault(w, len(vocab))
    xs = {d: {s: _bow(_docs(f), vocab) for s, f in parts.items()} for d, parts in data.items()}
    ys = {d: {s: torch.tensor(f["label"].to_numpy()) for s, f in parts.items()} for d, parts in data.items()}

    def acc(w, b, d: str) -> float:
        return float(((xs[d]["test"] @ w + b).argmax(1) == ys[d]["test"]).float().mean())

    w, b = _fit(torch.cat([xs[d]["train"] for d in data]), torch.cat([ys[d]["train"] for d in data]), n_labels)
    pooled = {d: acc(w, b, d) for d in data}
    single = {d: acc(*_fit(xs[d]["train"], ys[d]["train"], n_labels), d) for d in data}
    return pooled, single


@pytest.mark.parametrize("task, floor", [("mnli", 0.6), ("amazon", 0.7)])
def test_learnable_and_pooling_domains_helps(task: str, floor: float, mnli, amazon, one_thread) -> None:
    data, n_labels = (mnli, 3) if task == "mnli" else (amazon, 2)
    pooled, single = _accuracies(data, n_labels)
    pooled_mean = sum(pooled.values()) / len(pooled)
    single_mean = sum(single.values()) / len(single)
    assert pooled_mean > floor
    assert pooled_mean > single_mean + 0.02  # shared signal: more domains, better model
    assert max(pooled.values()) < 0.95  # label noise keeps it from being trivial
