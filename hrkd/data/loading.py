"""Tokenised splits and deterministic batch schedules for training and evaluation.

Splits are tokenised once into padded int32 tensors; a batch is an index tensor that is
gathered and trimmed to its longest row, so per-step Python work stays tiny. Schedules are
pure functions of (seed, epoch), which is what makes an interrupted run resumable to the
exact same result: the resumed run regenerates the epoch and skips the steps already done.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd
import torch

from hrkd.data.format import read_meta, read_split
from hrkd.errors import HRKDError
from hrkd.io import atomic_file

log = logging.getLogger("hrkd.data")

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class EncodedSplit:
    """One domain's split, tokenised and padded to ``max_seq_len``."""

    input_ids: torch.Tensor  # [N, Lmax] int32
    token_type_ids: torch.Tensor  # [N, Lmax] int8
    lengths: torch.Tensor  # [N] int32
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class TaskSplits:
    """A prepared task (or few-shot subset) as the trainers see it."""

    name: str
    labels: list[str]
    domains: list[str]
    splits: dict[str, dict[str, EncodedSplit]]  # domain -> split -> encoded

    def sizes(self, split: str) -> list[int]:
        return [len(self.splits[d][split]) for d in self.domains]

    def lengths(self, split: str) -> tuple[torch.Tensor, ...]:
        """Token lengths of every row, one tensor per domain in ``domains`` order (Schedule.lengths)."""
        return tuple(self.splits[d][split].lengths for d in self.domains)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    labels: torch.Tensor
    domain_ids: torch.Tensor  # [B] index into TaskSplits.domains

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(*(t.to(device, non_blocking=nb) for t in (
            self.input_ids, self.attention_mask, self.token_type_ids, self.labels, self.domain_ids)))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode_frame(frame: pd.DataFrame, tokenizer, max_seq_len: int, chunk: int = 4096) -> EncodedSplit:
    """Tokenise ``text``/``text_pair`` columns exactly as a BERT classifier would at inference."""
    texts = frame["text"].tolist()
    pairs = frame["text_pair"].tolist() if "text_pair" in frame and frame["text_pair"].notna().any() else None
    ids, types, lengths = [], [], []
    for start in range(0, len(texts), chunk):
        enc = tokenizer(
            texts[start : start + chunk],
            pairs[start : start + chunk] if pairs is not None else None,
            truncation=True,
            max_length=max_seq_len,
            padding="max_length",
            return_tensors="pt",
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        ids.append(enc["input_ids"].to(torch.int32))
        types.append(enc["token_type_ids"].to(torch.int8))
        lengths.append(enc["attention_mask"].sum(dim=1).to(torch.int32))
    if not ids:
        empty = torch.zeros((0, max_seq_len), dtype=torch.int32)
        return EncodedSplit(empty, empty.to(torch.int8), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.long))
    return EncodedSplit(
        input_ids=torch.cat(ids),
        token_type_ids=torch.cat(types),
        lengths=torch.cat(lengths),
        labels=torch.as_tensor(frame["label"].to_numpy().copy(), dtype=torch.long),
    )


def load_task(
    data_dir: str | Path,
    tokenizer,
    max_seq_len: int,
    splits: Sequence[str] = SPLITS,
    domains: Sequence[str] | None = None,
    cache: str | Path | None = None,
) -> TaskSplits:
    """Read a prepared task folder (meta.json + <domain>/<split>.parquet) and tokenise it.

    With ``cache`` (``engine.token_cache``), each split's encoding is kept there under a key of
    the parquet file's bytes, the tokenizer's full definition, ``max_seq_len`` and this module's
    source, and later stages read it instead of tokenising again (MNLI's demo splits: 0.65 s to
    tokenise, 4 ms to read).
    """
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    all_domains = list(meta.domains)
    chosen = list(domains) if domains is not None else all_domains
    unknown = [d for d in chosen if d not in all_domains]
    if unknown:
        raise HRKDError(f"unknown domain(s) {unknown} for {data_dir}: available domains are {all_domains}")
    store = TokenCache(cache, tokenizer, max_seq_len) if cache is not None else None
    encoded = {}
    for domain in chosen:
        encoded[domain] = {}
        for split in splits:
            frame = read_split(data_dir, domain, split)  # checks the file, cached or not
            entry = store.entry(data_dir / domain / f"{split}.parquet") if store else None
            hit = store.get(entry) if entry else None
            if hit is None:
                hit = encode_frame(frame, tokenizer, max_seq_len)
                if entry:
                    store.put(entry, hit)
            encoded[domain][split] = hit
    return TaskSplits(name=meta.task, labels=list(meta.labels), domains=chosen, splits=encoded)


_ENCODED_FIELDS = tuple(f.name for f in fields(EncodedSplit))


class TokenCache:
    """Encoded splits on disk, content-addressed: a changed file, tokenizer or width is a miss.

    A pure cache (outside DVC, safe to delete): an entry is only ever read for the exact inputs it
    was computed from, and an unreadable one is recomputed and rewritten.
    """

    def __init__(self, root: str | Path, tokenizer, max_seq_len: int) -> None:
        self.root = Path(root)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.base = None  # no fast tokenizer: no cache
        if backend is not None:
            # The fast tokenizer's JSON is its whole pipeline (normaliser, vocabulary, post-processor)
            # less the padding/truncation state its last call left, which encode_frame sets anew;
            # the sides are the Python wrapper's.
            spec = json.loads(backend.to_str())
            spec.pop("padding", None)
            spec.pop("truncation", None)
            self.base = hashlib.sha256("\0".join([
                json.dumps(spec, sort_keys=True), type(tokenizer).__name__, str(tokenizer.padding_side),
                str(tokenizer.truncation_side), str(int(max_seq_len)), Path(__file__).read_text(encoding="utf-8"),
            ]).encode()).hexdigest()

    def entry(self, parquet: Path) -> Path | None:
        """Where the encoding of ``parquet`` is kept (None: not cacheable)."""
        if self.base is None:
            return None
        digest = hashlib.sha256(self.base.encode() + Path(parquet).read_bytes()).hexdigest()[:32]
        return self.root / f"{digest}.pt"

    def get(self, path: Path) -> EncodedSplit | None:
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return EncodedSplit(**{name: state[name] for name in _ENCODED_FIELDS})
        except Exception as err:  # a torn or foreign file: tokenise again and overwrite it
            log.warning("ignoring unreadable token cache entry %s (%s)", path, err)
            return None

    def put(self, path: Path, split: EncodedSplit) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "wb") as handle:
                torch.save({name: getattr(split, name) for name in _ENCODED_FIELDS}, handle)
        except OSError as err:  # a read-only or full disk costs speed, never the run
            log.warning("token cache not written to %s (%s)", path, err)


def collate(task: TaskSplits, split: str, groups: Sequence[tuple[int, torch.Tensor]]) -> Batch:
    """Gather rows of several (domain, indices) groups into one batch, trimmed to its longest row."""
    ids, types, lens, labels, doms = [], [], [], [], []
    for domain, idx in groups:
        enc = task.splits[task.domains[domain]][split]
        ids.append(enc.input_ids[idx])
        types.append(enc.token_type_ids[idx])
        lens.append(enc.lengths[idx])
        labels.append(enc.labels[idx])
        doms.append(torch.full((len(idx),), domain, dtype=torch.long))
    lengths = torch.cat(lens)
    width = max(int(lengths.max()), 1) if len(lengths) else 1
    input_ids = torch.cat(ids)[:, :width].long()
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return Batch(input_ids, mask, torch.cat(types)[:, :width].long(), torch.cat(labels), torch.cat(doms))


def eval_batches(task: TaskSplits, split: str, domain: int, batch_size: int) -> Iterator[Batch]:
    n = len(task.splits[task.domains[domain]][split])
    for start in range(0, n, batch_size):
        yield collate(task, split, [(domain, torch.arange(start, min(start + batch_size, n)))])


# ---------------------------------------------------------------------------------------------
# Training schedules. A step is a list of (domain index, row indices) groups.
# ---------------------------------------------------------------------------------------------

Step = list[tuple[int, torch.Tensor]]


def _generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    # Distinct, reproducible streams per (seed, epoch, domain) without sharing global RNG state.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + salt) % (2**63 - 1))


def _chunks(idx: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(torch.split(idx, size))


# Salt of the stream that shuffles length-grouped batches: the row permutations of the same
# (seed, epoch) use 0 and domain + 1.
_GROUP_SALT = -1


def _by_length(idx: torch.Tensor, lengths: torch.Tensor, megabatch: int) -> torch.Tensor:
    """``idx`` with every run of ``megabatch`` entries sorted longest first (stable: deterministic)."""
    parts = []
    for mega in torch.split(idx, megabatch):
        parts.append(mega[torch.sort(lengths[mega], descending=True, stable=True).indices])
    return torch.cat(parts) if parts else idx


@dataclass(frozen=True)
class Schedule:
    """Which rows every optimisation step sees, as a deterministic function of (seed, epoch).

    kind:
      * ``single``  - one domain only (BERT-single, TinyBERT-KD single-domain students);
      * ``mix``     - all domains pooled and shuffled, batches mix domains;
      * ``mtl``     - each batch from one domain, domains visited in proportion to their size
                      (all of an epoch's per-domain batches, shuffled together: MT-DNN);
      * ``parallel``- every step takes one batch from every domain (HRKD, section 2.1). An epoch
                      is as long as the largest domain (ceil(n_max / batch) steps); smaller
                      domains are reshuffled and cycled, so all domains contribute equally.

    ``group_by_length`` > 0 (HF's ``group_by_length``; 0 = off, the paper's random batches) cuts
    the epoch's permutation into megabatches of that many batches and sorts each by ``lengths``,
    so a batch holds rows of similar length and ``collate`` pads less; the batches are then
    shuffled, so the order stays random. An epoch still holds exactly the same rows. In
    ``parallel`` the domains are sorted megabatch by megabatch in step, and the k-th batches of
    every domain share a step, because a step is padded to the longest row of all its domains.
    """

    kind: str
    sizes: tuple[int, ...]
    batch_size: int
    seed: int
    domain: int = 0  # for kind == "single"
    # Train-row token lengths, one tensor per domain (TaskSplits.lengths("train")); read only when
    # grouping. Not compared: tensors have no single truth value.
    lengths: tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)
    group_by_length: int = 0

    def __post_init__(self) -> None:
        if self.kind not in {"single", "mix", "mtl", "parallel"}:
            raise ValueError(f"unknown schedule kind {self.kind!r}")
        if self.group_by_length < 0:
            raise HRKDError(f"group_by_length is {self.group_by_length}: "
                            "use 0 (off) or the number of batches per megabatch")
        if self.group_by_length:
            if self.lengths is None:
                raise HRKDError("group_by_length needs the rows' lengths: "
                                "pass lengths=task.lengths('train') to Schedule")
            got = [len(t) for t in self.lengths]
            if got != list(self.sizes):
                raise HRKDError(f"Schedule lengths have {got} rows per domain but sizes are {list(self.sizes)}: "
                                "pass lengths and sizes of the same split and domains")
        if self.kind == "single" and self.sizes[self.domain] == 0 or sum(self.sizes) == 0:
            raise HRKDError("no training rows: check the prepared data (a domain's train split is empty)")
        if self.kind == "parallel" and min(self.sizes) == 0:
            raise HRKDError("a domain has no training rows: every domain needs data for multi-domain training")

    @property
    def steps_per_epoch(self) -> int:
        b = self.batch_size
        if self.kind == "single":
            return -(-self.sizes[self.domain] // b)
        if self.kind == "mix":
            return -(-sum(self.sizes) // b)
        if self.kind == "mtl":
            return sum(-(-n // b) for n in self.sizes)
        return max(-(-n // b) for n in self.sizes)

    def _order(self, epoch: int, n: int) -> list[int]:
        # A grouped megabatch runs longest to shortest; shuffling its batches (with a stream of
        # their own, so the row permutations stay the ungrouped ones) keeps the order random.
        if not self.group_by_length:
            return list(range(n))
        return torch.randperm(n, generator=_generator(self.seed, epoch, _GROUP_SALT)).tolist()

    def epoch(self, epoch: int) -> list[Step]:
        b, mega = self.batch_size, self.group_by_length * self.batch_size
        if self.kind == "single":
            perm = torch.randperm(self.sizes[self.domain], generator=_generator(self.seed, epoch))
            if mega:
                perm = _by_length(perm, self.lengths[self.domain], mega)
            chunks = _chunks(perm, b)
            return [[(self.domain, chunks[i])] for i in self._order(epoch, len(chunks))]
        if self.kind == "mix":
            domains = torch.cat([torch.full((n,), d, dtype=torch.long) for d, n in enumerate(self.sizes)])
            rows = torch.cat([torch.arange(n) for n in self.sizes])
            perm = torch.randperm(len(rows), generator=_generator(self.seed, epoch))
            if mega:
                perm = _by_length(perm, torch.cat(list(self.lengths)), mega)
            chunks = _chunks(perm, b)
            steps = []
            for chunk in (chunks[i] for i in self._order(epoch, len(chunks))):
                d, r = domains[chunk], rows[chunk]
                steps.append([(int(k), r[d == k]) for k in torch.unique(d)])
            return steps
        if self.kind == "mtl":
            batches = []
            for d, n in enumerate(self.sizes):
                perm = torch.randperm(n, generator=_generator(self.seed, epoch, salt=d + 1))
                if mega:
                    perm = _by_length(perm, self.lengths[d], mega)
                batches.extend([(d, chunk)] for chunk in _chunks(perm, b))
            # This shuffle of all domains' batches is the one grouping needs too.
            order = torch.randperm(len(batches), generator=_generator(self.seed, epoch))
            return [batches[i] for i in order.tolist()]
        steps_n = self.steps_per_epoch
        per_domain = []
        for d, n in enumerate(self.sizes):
            # Every step takes a full batch from every domain; smaller domains are reshuffled and
            # cycled (a domain smaller than one batch contributes all its rows each step).
            size = min(b, n)
            need = steps_n * size
            perms = [torch.randperm(n, generator=_generator(self.seed, epoch * 1000 + k, salt=d + 1))
                     for k in range(-(-need // n))]
            stream = torch.cat(perms)[:need]
            if mega and size < n:
                # Megabatch k of every domain covers the same steps, so its i-th longest batch
                # lands in the same step in all domains. A domain smaller than a batch is left
                # alone: each step already holds all of it, and sorting across cycles would not.
                stream = _by_length(stream, self.lengths[d], self.group_by_length * size)
            per_domain.append([stream[i * size : (i + 1) * size] for i in range(steps_n)])
        # One order for all domains: shuffling them apart would undo the pairing.
        return [[(d, per_domain[d][s]) for d in range(len(self.sizes))] for s in self._order(epoch, steps_n)]


def shard(step: Step, rank: int, world: int) -> Step:
    """This process's share of every group of a global step (DDP): contiguous, equal-as-possible."""
    if world == 1:
        return step
    return [(d, idx.tensor_split(world)[rank]) for d, idx in step]
