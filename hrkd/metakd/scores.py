"""Transferability scores t_i of Meta-KD (spec 1a), computed once per task from the frozen pre-trained teacher.

E(x) is the mean of the pre-trained (not fine-tuned) teacher encoder's last-layer states over
positions 1.. ([CLS] dropped) of the row padded to ``max_seq_len``, padding included as in the
authors' extract_embeddings.py (``metakd.scores.mask_padding: true`` averages real tokens only).

* ``paper`` (default): per-class, per-domain prototypes p^k_m = mean of E over domain k's rows
  of label m, and t_i = alpha cos(E_i, p^k_{y_i}) + zeta (1/(K-1)) sum_{k' != k} cos(E_i, p^{k'}_{y_i}).
* ``code``: per-domain centroids c_k (labels ignored) and
  t_i = alpha cos(E_i, c_k) + zeta cos(E_i, mean_{k' != k} c_{k'}) - the cosine to the mean of the
  other centroids, with alpha = zeta = 1/2 in the code.

Scores cover every training row of the prepared task and are stored with the row's uid, so the
trainers look them up by (domain, row) and a stale cache (data re-prepared) is detected.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hrkd.data.format import read_split
from hrkd.errors import HRKDError
from hrkd.io import atomic_dir, write_json
from hrkd.metakd.losses import masked_positions_mean

log = logging.getLogger("hrkd.metakd.scores")

SCORES_FILE = "scores.parquet"
SUMMARY_FILE = "summary.json"
VARIANTS = ("paper", "code")


# ---------------------------------------------------------------------------------------------
# The scores (pure)
# ---------------------------------------------------------------------------------------------


def _check_inputs(emb: Tensor, domains: Tensor, num_domains: int) -> None:
    if emb.dim() != 2 or domains.shape != emb.shape[:1]:
        raise ValueError(f"need embeddings [N, H] and domain ids [N], got {tuple(emb.shape)} and {tuple(domains.shape)}")
    if num_domains < 2:
        raise HRKDError(f"Meta-KD scores compare a domain with the others, but the task has {num_domains} domain; "
                        "use a task with at least 2 domains")
    present = torch.bincount(domains, minlength=num_domains)
    if len(present) > num_domains or bool((present == 0).any()):
        raise HRKDError(f"every one of the {num_domains} domains needs training rows to score (rows per domain: "
                        f"{present.tolist()}); check the prepared data")


def transferability_code(emb: Tensor, domains: Tensor, num_domains: int, alpha: float = 0.5,
                         zeta: float = 0.5) -> Tensor:
    """The authors' per-domain-centroid score, [N]: alpha cos(E_i, c_k) + zeta cos(E_i, mean_{k'!=k} c_k')."""
    _check_inputs(emb, domains, num_domains)
    emb = emb.float()
    counts = torch.bincount(domains, minlength=num_domains).to(emb.dtype)
    centroids = torch.zeros(num_domains, emb.shape[1], dtype=emb.dtype).index_add_(0, domains, emb) / counts[:, None]
    others = (centroids.sum(0, keepdim=True) - centroids) / (num_domains - 1)  # [K, H] mean of the other centroids
    unit = F.normalize(emb, dim=-1)
    own = (unit * F.normalize(centroids, dim=-1)[domains]).sum(-1)
    cross = (unit * F.normalize(others, dim=-1)[domains]).sum(-1)
    return alpha * own + zeta * cross


def transferability_paper(emb: Tensor, domains: Tensor, labels: Tensor, num_domains: int, num_labels: int,
                          alpha: float = 0.5, zeta: float = 0.5) -> Tensor:
    """The paper's per-class-per-domain prototype score, [N].

    t_i = alpha cos(E_i, p^k_{y_i}) + zeta mean_{k' != k} cos(E_i, p^{k'}_{y_i}). A domain with no row
    of label y has no prototype p^{k'}_y and is left out of that mean; if no other domain has label y
    at all, the cross term falls back to the own-domain cosine (logged).
    """
    _check_inputs(emb, domains, num_domains)
    if labels.shape != domains.shape or bool(((labels < 0) | (labels >= num_labels)).any()):
        raise ValueError(f"labels must be [N] ids in 0..{num_labels - 1}")
    emb = emb.float()
    K, M = num_domains, num_labels
    key = domains * M + labels
    counts = torch.bincount(key, minlength=K * M).to(emb.dtype)  # [K*M]
    protos = torch.zeros(K * M, emb.shape[1], dtype=emb.dtype).index_add_(0, key, emb) / counts.clamp(min=1)[:, None]
    # Cosine of every row to every prototype ([N, K*M]: tiny next to E), then each row's label column per domain.
    sims = F.normalize(emb, dim=-1) @ F.normalize(protos, dim=-1).T
    cols = torch.arange(K)[None, :] * M + labels[:, None]  # [N, K]: prototype of label y_i in domain k'
    per_domain = sims.gather(1, cols)  # [N, K]
    exists = (counts > 0)[cols]  # [N, K]
    own = per_domain.gather(1, domains[:, None]).squeeze(1)
    other = exists & (torch.arange(K)[None, :] != domains[:, None])
    n_other = other.sum(1)
    cross = torch.where(other, per_domain, torch.zeros_like(per_domain)).sum(1) / n_other.clamp(min=1)
    lonely = n_other == 0
    if bool(lonely.any()):
        log.warning("%d row(s) have a label no other domain has; their cross-domain term uses the own-domain cosine",
                    int(lonely.sum()))
        cross = torch.where(lonely, own, cross)
    return alpha * own + zeta * cross


def score(emb: Tensor, domains: Tensor, labels: Tensor, num_domains: int, num_labels: int, variant: str,
          alpha: float, zeta: float) -> Tensor:
    if variant == "paper":
        return transferability_paper(emb, domains, labels, num_domains, num_labels, alpha, zeta)
    if variant == "code":
        return transferability_code(emb, domains, num_domains, alpha, zeta)
    raise HRKDError(f"unknown metakd.scores.variant '{variant}': use one of {list(VARIANTS)}")


# ---------------------------------------------------------------------------------------------
# E(x) from the frozen pre-trained encoder
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def embed_rows(encoder: torch.nn.Module, split, batch_size: int, device: torch.device,
               mask_padding: bool = False) -> Tensor:
    """E(x) of every row of an :class:`~hrkd.data.loading.EncodedSplit`, [N, H] float32 on the CPU.

    Rows keep the split's full ``max_seq_len`` width (the code pads to 128) unless padding is
    masked, where trimming each batch to its longest row gives the same means faster. fp32, no
    autocast: the scores are cosines of nearly parallel vectors, where bf16 would blur the spread.
    """
    encoder.eval()
    n, width = split.input_ids.shape
    out = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        lengths = split.lengths[start:stop].long()
        w = max(int(lengths.max()), 2) if mask_padding else width
        mask = (torch.arange(w)[None, :] < lengths[:, None]).long()
        hidden = encoder(input_ids=split.input_ids[start:stop, :w].long().to(device),
                         attention_mask=mask.to(device),
                         token_type_ids=split.token_type_ids[start:stop, :w].long().to(device)).last_hidden_state
        out.append(masked_positions_mean(hidden.float(), mask.to(device) if mask_padding else None).cpu())
    hidden_size = int(encoder.config.hidden_size)
    return torch.cat(out) if out else torch.zeros(0, hidden_size)


def _stats(t: Tensor) -> dict[str, float]:
    t = t.double()
    return {"n": int(t.numel()), "mean": round(float(t.mean()), 6), "std": round(float(t.std(unbiased=False)), 6),
            "min": round(float(t.min()), 6), "max": round(float(t.max()), 6)}


def compute_scores(*, task, data_dir: str | Path, encoder: torch.nn.Module, settings, device: torch.device,
                   out_dir: str | Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Score every training row of ``task`` and write ``out_dir/{scores.parquet, summary.json}`` atomically.

    ``task`` is a :class:`~hrkd.data.loading.TaskSplits` with at least the train split;
    ``settings`` is the ``metakd.scores`` section. Returns the summary.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    K = len(task.domains)
    embs, doms, labels, uids, rows = [], [], [], [], []
    for d, name in enumerate(task.domains):
        split = task.splits[name]["train"]
        frame_uids = read_split(data_dir, name, "train")["uid"].tolist()
        if len(frame_uids) != len(split):
            raise HRKDError(f"{data_dir}/{name}/train.parquet has {len(frame_uids)} rows but {len(split)} were "
                            "tokenised; rerun the prepare stage")
        log.info("embedding %d %s/%s training rows", len(split), task.name, name)
        embs.append(embed_rows(encoder, split, settings.batch_size, device, settings.mask_padding))
        doms.append(torch.full((len(split),), d, dtype=torch.long))
        labels.append(split.labels)
        uids.extend(frame_uids)
        rows.append(torch.arange(len(split)))
    emb, domains, label_ids = torch.cat(embs), torch.cat(doms), torch.cat(labels)
    t = score(emb, domains, label_ids, K, len(task.labels), settings.variant, settings.alpha, settings.zeta)
    if not bool(torch.isfinite(t).all()):
        raise HRKDError("some transferability scores are not finite (an all-zero embedding?); check the teacher encoder")
    summary = {"task": task.name, "variant": settings.variant, "alpha": settings.alpha, "zeta": settings.zeta,
               "mask_padding": settings.mask_padding, **provenance,
               "domains": {name: _stats(t[domains == d]) for d, name in enumerate(task.domains)}, "all": _stats(t)}
    table = pa.table({
        "uid": pa.array(uids, pa.string()),
        "domain": pa.array([task.domains[d] for d in domains.tolist()], pa.string()),
        "row": pa.array(torch.cat(rows).numpy(), pa.int64()),
        "label": pa.array(label_ids.numpy(), pa.int64()),
        "t": pa.array(t.float().numpy(), pa.float32()),
    })
    with atomic_dir(out_dir) as tmp:
        # Fixed writer options and no pandas metadata: a rerun writes identical bytes.
        pq.write_table(table, tmp / SCORES_FILE, compression="zstd", compression_level=3, version="2.6",
                       data_page_version="1.0", use_dictionary=True, write_statistics=True)
        write_json(tmp / SUMMARY_FILE, summary)
    for name in task.domains:
        s = summary["domains"][name]
        log.info("t(%s/%s): mean %.4f std %.4f min %.4f max %.4f", task.name, name, s["mean"], s["std"], s["min"], s["max"])
    return summary


# ---------------------------------------------------------------------------------------------
# Reading the cache back
# ---------------------------------------------------------------------------------------------


def load_scores(scores: str | Path, data_dir: str | Path, task) -> list[Tensor]:
    """t of every training row of ``task``, as one float32 tensor per domain indexed by row.

    ``scores`` is the stage's folder (or its scores.parquet); ``data_dir`` the prepared folder the
    task was read from. Rows are matched by uid, so a few-shot subset (a prefix of each domain's
    train split) finds its scores too, and a cache from other data fails here with the fix.
    """
    import pandas as pd

    path = Path(scores)
    if path.is_dir():
        path = path / SCORES_FILE
    fix = f"run `dvc repro metakd_scores@{task.name}`"
    if not path.is_file():
        raise HRKDError(f"transferability scores {path} not found: {fix} first")
    frame = pd.read_parquet(path, columns=["uid", "domain", "t"])
    out = []
    for name in task.domains:
        uids = read_split(data_dir, name, "train")["uid"]
        if len(uids) != len(task.splits[name]["train"]):
            raise HRKDError(f"{data_dir}/{name}: {len(uids)} train rows on disk but {len(task.splits[name]['train'])} "
                            "loaded; load the task from the same folder")
        own = frame[frame["domain"] == name].set_index("uid")["t"]
        if not own.index.is_unique:
            raise HRKDError(f"{path}: duplicate uids in domain {name}; {fix}")
        values = own.reindex(uids).to_numpy(dtype="float32")
        missing = int(pd.isna(values).sum())
        if missing:
            raise HRKDError(f"{path} has no score for {missing} of the {len(uids)} {name} training rows in {data_dir} "
                            f"(stale cache?); {fix}")
        out.append(torch.from_numpy(values.copy()))
    return out


def gather_scores(scores: Sequence[Tensor], step) -> Tensor:
    """t of a schedule step's rows, in :func:`~hrkd.data.loading.collate` order (one index per domain group)."""
    return torch.cat([scores[d][idx] for d, idx in step]) if step else torch.zeros(0)


def summary_line(summary: dict[str, Any]) -> str:
    s = summary["all"]
    spread = s["max"] - s["min"]
    return (f"t over {s['n']} rows: mean {s['mean']:.4f}, std {s['std']:.4f}, range {spread:.4f}"
            + (" (near-uniform weights)" if not math.isnan(spread) and s["std"] < 0.02 else ""))
