"""A small generated multi-domain corpus that stands in for MNLI and Amazon Reviews offline.

It is shaped like the real tasks (same domain names, labels, sentence-pair vs single text) and
built so the comparisons the paper makes still mean something at toy scale:

* shared signal: cue words that mean the same in every domain (negations for contradiction,
  hedges for neutral, "great"/"awful" for sentiment), so pooling domains helps;
* domain signal: each domain has its own topic words and its own cue words, and a few "flip"
  words whose label depends on the domain (like "unpredictable" for a plot vs a kettle), so a
  model has to know the domain, and blind pooling also hurts a little;
* structure a transformer can use: entailed hypotheses copy premise words, neutral ones add
  new topic words;
* ~10% label noise, so no model reaches 100%.

Everything is drawn from ``random.Random`` seeded by sha256 of (seed, task, domain, split), so
a domain's data does not change when other domains are added or removed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import pandas as pd

from hrkd.config import AMAZON_DOMAINS, AMAZON_LABELS, MNLI_DOMAINS, MNLI_LABELS, DemoSizes
from hrkd.data.format import SPLITS, make_frame

log = logging.getLogger("hrkd.data.demo")

LABEL_NOISE = 0.1
# How often a cue word is a flip word / a domain's own cue (else a shared cue).
P_FLIP = 0.1
P_DOMAIN = 0.2
# Train sizes of Table 1: demo domains keep their relative sizes (telephone is the large one).
TABLE1_TRAIN = {
    "mnli": {"fiction": 69613, "government": 69615, "slate": 69575, "telephone": 75013, "travel": 69615},
    "amazon": {"books": 1631, "dvd": 1621, "electronics": 1615, "kitchen": 1613},
}

FUNCTION = "the a of in on to and with at for was is it this that from by as then there".split()
NOUNS = "man woman people group family friend city house day night year time place work money road water door plan week".split()
VERBS = "saw made took found gave kept said met left built told moved called helped watched".split()

MNLI_TOPICS = {
    "fiction": "dragon castle knight forest witch sword princess cave wizard ghost tower village horse river king secret",
    "government": "senate policy budget agency law tax congress report program federal committee vote official rule bill office",
    "slate": "column editor pundit election magazine critic media campaign essay scandal president poll debate article press writer",
    "telephone": "phone weekend kids dog school garden car dinner cousin football game neighbor movie church yard truck",
    "travel": "beach hotel museum island temple harbor market palace tour coast mountain resort cruise ferry plaza cathedral",
}
MNLI_SHARED_CUES = (
    "indeed surely certainly clearly truly exactly really definitely obviously plainly undoubtedly literally "
    "actually precisely wholly fully genuinely entirely completely openly directly namely simply rightly".split(),
    "maybe perhaps probably possibly might later because also likely sometimes usually soon tomorrow mostly "
    "partly reportedly allegedly hopefully eventually apparently occasionally rarely supposedly presumably".split(),
    "not never no nobody nothing none cannot neither nowhere without lacks fails refuses unable impossible "
    "false nor denies wrong untrue hates forbids lost missing".split(),
)
MNLI_DOMAIN_CUES = {
    "fiction": ("faithfully aloud together", "someday dreamed wished", "refused forgot vanished"),
    "government": ("officially formally confirmed", "proposed planned expected", "rejected repealed vetoed"),
    "slate": ("agreed admitted noted", "speculated rumored suggested", "denied disputed retracted"),
    "telephone": ("yeah right sure", "guess suppose reckon", "nope nah hardly"),
    "travel": ("famous visible open", "seasonal crowded popular", "closed destroyed abandoned"),
}
MNLI_FLIPS = "only still again almost even".split()

AMAZON_TOPICS = {
    "books": "novel author chapter plot character page reader writing series edition biography poem library cover ending hero",
    "dvd": "movie film actor scene director episode season dvd cast soundtrack comedy drama sequel screen trailer studio",
    "electronics": "battery cable speaker remote charger headphones laptop keyboard mouse radio player software signal button device adapter",
    "kitchen": "pan knife blender kettle pot mixer toaster coffee oven lid handle spoon bowl skillet grinder dishwasher",
}
AMAZON_SHARED_CUES = (
    "bad poor terrible waste worst disappointed awful useless horrible refund broken junk cheap mediocre "
    "annoying regret returned avoid garbage frustrating unhappy flawed lousy pathetic".split(),
    "great excellent love perfect best wonderful happy recommend amazing fantastic superb favorite enjoy "
    "beautiful pleased solid awesome impressed delightful outstanding terrific glad satisfied lovely".split(),
)
AMAZON_DOMAIN_CUES = {
    "books": ("tedious shallow dull rambling", "gripping insightful moving inspiring"),
    "dvd": ("unwatchable cheesy overacted boring", "hilarious stunning touching brilliant"),
    "electronics": ("defective dead static overheats", "reliable crisp fast sleek"),
    "kitchen": ("flimsy rusted leaks dented", "sturdy sharp easy durable"),
}
AMAZON_FLIPS = "unpredictable long quiet light".split()

_SYLLABLES = "ba ko ri tu ne sa mo li da ve pu ga lo fi ze ka".split()


@dataclass(frozen=True)
class DomainWords:
    """The vocabulary one domain draws from."""

    topics: tuple[str, ...]
    cues: tuple[tuple[str, ...], ...]  # per label: shared cues
    domain_cues: tuple[tuple[str, ...], ...]  # per label: this domain's own cues
    flips: tuple[tuple[str, ...], ...]  # per label: flip words that mean this label here


def _pseudo_words(domain: str, n: int, salt: str) -> tuple[str, ...]:
    """Made-up words for a domain without a hand-written bank (e.g. MNLI's extra genres)."""
    rng = random.Random(zlib.crc32(f"{domain}/{salt}".encode()))
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(3))
        if word not in words:
            words.append(word)
    return tuple(words)


def _domain_index(domain: str, known: Sequence[str]) -> int:
    return known.index(domain) if domain in known else zlib.crc32(domain.encode())


def domain_words(task: str, domain: str) -> DomainWords:
    """Word banks of ``domain`` in the demo version of ``task`` ("mnli" or "amazon")."""
    if task == "mnli":
        topics, shared, cues, flips, known = MNLI_TOPICS, MNLI_SHARED_CUES, MNLI_DOMAIN_CUES, MNLI_FLIPS, MNLI_DOMAINS
    else:
        topics, shared, cues, flips, known = AMAZON_TOPICS, AMAZON_SHARED_CUES, AMAZON_DOMAIN_CUES, AMAZON_FLIPS, AMAZON_DOMAINS
    n_labels = len(shared)
    topic = tuple(topics[domain].split()) if domain in topics else _pseudo_words(domain, 16, "topic")
    if domain in cues:
        own = tuple(tuple(words.split()) for words in cues[domain])
    else:
        made = _pseudo_words(domain, 3 * n_labels, "cue")
        own = tuple(made[3 * i : 3 * i + 3] for i in range(n_labels))
    # Flip word j means label j mod L everywhere except in one domain (index j), where it means
    # the next label: pooling learns the common reading, only domain-aware models get both.
    index = _domain_index(domain, known) % len(known)
    meaning = [(j + (j % len(known) == index)) % n_labels for j in range(len(flips))]
    flip = tuple(tuple(w for w, m in zip(flips, meaning) if m == label) for label in range(n_labels))
    return DomainWords(topic, tuple(tuple(c) for c in shared), own, flip)


def _seeded(seed: int, *parts: str) -> random.Random:
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _cue(rng: random.Random, words: DomainWords, label: int) -> str:
    # Shared cues dominate so that pooling domains pays; flip words need the domain to decode.
    draw = rng.random()
    if draw < P_FLIP and words.flips[label]:
        return rng.choice(words.flips[label])
    if draw < P_FLIP + P_DOMAIN:
        return rng.choice(words.domain_cues[label])
    return rng.choice(words.cues[label])


def _cues(rng: random.Random, words: DomainWords, label: int, most: int) -> list[str]:
    chosen = [_cue(rng, words, label) for _ in range(rng.randint(1, most))]
    if rng.random() < 0.25:  # a misleading shared cue of another label, as real text has
        other = rng.choice([k for k in range(len(words.cues)) if k != label])
        chosen.append(rng.choice(words.cues[other]))
    return chosen


def _noisy(rng: random.Random, label: int, n_labels: int) -> int:
    if rng.random() < LABEL_NOISE:
        return rng.choice([k for k in range(n_labels) if k != label])
    return label


def _balanced_labels(rng: random.Random, n: int, n_labels: int) -> list[int]:
    labels = [i % n_labels for i in range(n)]
    rng.shuffle(labels)
    return labels


def mnli_pair(rng: random.Random, words: DomainWords, label: int) -> tuple[str, str]:
    """A premise and a hypothesis whose relation is ``label`` (entailment/neutral/contradiction)."""
    content = rng.sample(words.topics, rng.randint(3, 5)) + [rng.choice(NOUNS), rng.choice(VERBS)]
    rng.shuffle(content)
    premise = list(content)
    for _ in range(rng.randint(3, 5)):
        premise.insert(rng.randrange(len(premise) + 1), rng.choice(FUNCTION))
    if label == 0:  # entailment: a faithful subset of the premise
        kept = sorted(rng.sample(range(len(content)), rng.randint(3, min(5, len(content)))))
        body = [content[i] for i in kept]
    elif label == 1:  # neutral: about the premise, but adds unseen facts
        body = rng.sample(content, rng.randint(1, 2)) + rng.sample([w for w in words.topics if w not in content], 2)
    else:  # contradiction: restates the premise, negated
        kept = sorted(rng.sample(range(len(content)), rng.randint(2, 4)))
        body = [content[i] for i in kept]
    for cue in _cues(rng, words, label, 2):
        body.insert(rng.randrange(len(body) + 1), cue)
    body.insert(0, rng.choice(("the", "a", "it", "there")))
    return " ".join(premise) + " .", " ".join(body) + " ."


def amazon_review(rng: random.Random, words: DomainWords, label: int) -> str:
    """A short review of a product of the domain with sentiment ``label`` (0 negative, 1 positive)."""
    body = rng.sample(words.topics, rng.randint(3, 5)) + [rng.choice(NOUNS) for _ in range(rng.randint(1, 2))]
    body += _cues(rng, words, label, 2)
    rng.shuffle(body)
    for _ in range(rng.randint(4, 7)):
        body.insert(rng.randrange(len(body) + 1), rng.choice(FUNCTION))
    return " ".join(body) + " ."


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def domain_sizes(task: str, domain: str, sizes: DemoSizes) -> dict[str, int]:
    """Per-split sizes: train and dev scaled by the domain's Table 1 share, test kept equal."""
    table = TABLE1_TRAIN[task]
    weight = Fraction(table[domain] * len(table), sum(table.values())) if domain in table else Fraction(1)
    return {
        "train": max(1, _round_half_up(sizes.train * weight)),
        "dev": max(1, _round_half_up(sizes.dev * weight)),
        "test": sizes.test,
    }


def build_demo(
    task: str, domains: Sequence[str], sizes: DemoSizes, seed: int
) -> tuple[dict[str, dict[str, pd.DataFrame]], tuple[str, ...], bool]:
    """The demo corpus of ``task`` ("mnli" or "amazon"): splits per domain, labels, text_pair flag."""
    if task not in TABLE1_TRAIN:
        raise ValueError(f"no demo corpus for task kind {task!r}")
    labels = MNLI_LABELS if task == "mnli" else AMAZON_LABELS
    pair = task == "mnli"
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for domain in domains:
        words = domain_words(task, domain)
        split_sizes = domain_sizes(task, domain, sizes)
        out[domain] = {}
        for split in SPLITS:
            rng = _seeded(seed, task, domain, split)
            clean = _balanced_labels(rng, split_sizes[split], len(labels))
            texts: list[str] = []
            pairs: list[str] = []
            noisy: list[int] = []
            for label in clean:
                if pair:
                    premise, hypothesis = mnli_pair(rng, words, label)
                    texts.append(premise)
                    pairs.append(hypothesis)
                else:
                    texts.append(amazon_review(rng, words, label))
                noisy.append(_noisy(rng, label, len(labels)))
            uids = [f"demo/{domain}/{split}/{i:05d}" for i in range(len(clean))]
            out[domain][split] = make_frame(uids, texts, pairs if pair else None, noisy)
        log.info("demo %s/%s: %s", task, domain, split_sizes)
    return out, labels, pair
