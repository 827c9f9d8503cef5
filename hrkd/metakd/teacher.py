"""The Meta-KD meta-teacher (spec 1b): teacher kind ``meta`` of the train_teacher code.

A ``mix``-style teacher (one head, all domains pooled and shuffled) plus the authors' domain
branch on the mean-pooled last layer h-bar:

    r = W_d (h-bar + e_k) + b_d          e_k: learned embedding of the row's TRUE domain k
    q = W_q dropout(tanh(r)) + b_q       K domain logits

trained with the "domain corruption" loss CE(q_i, z~_i) against the batch's domain ids randomly
permuted (no gradient reversal: the optimum is the batch's domain mix, which pushes h-bar to
carry no domain information). Per example l_i = CE_i + gamma1 L_DA,i; the batch loss is
mean_i t_i l_i with the transferability scores t_i of :mod:`hrkd.metakd.scores`.

Each saved per-domain teacher folder is a plain ``BertForSequenceClassification`` (like every
teacher) plus ``metakd_branch.{safetensors,json}``: meta-distillation needs the branch for the
transferable-knowledge target r^T (no tanh).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from hrkd.data.loading import Batch, Step, TaskSplits, collate
from hrkd.errors import HRKDError
from hrkd.io import read_json, write_json
from hrkd.metakd.losses import masked_positions_mean, meta_teacher_loss
from hrkd.metakd.scores import gather_scores
from hrkd.teachers import train_teacher

log = logging.getLogger("hrkd.metakd.teacher")

BRANCH_WEIGHTS = "metakd_branch.safetensors"
BRANCH_META = "metakd_branch.json"


@dataclass
class MetaBatch:
    """A training batch plus each row's transferability score t_i ([B], same row order)."""

    batch: Batch
    weights: Tensor

    def to(self, device: torch.device) -> "MetaBatch":
        return MetaBatch(self.batch.to(device), self.weights.to(device, non_blocking=device.type == "cuda"))

    def __len__(self) -> int:
        return len(self.batch)


def make_meta_batch(task: TaskSplits, split: str, step: Step, scores: Sequence[Tensor] | None,
                    device: torch.device | None = None) -> MetaBatch:
    """Collate a schedule step and look up its rows' t_i by (domain, row) - one gather per domain group."""
    batch = collate(task, split, step)
    weights = gather_scores(scores, step) if scores is not None else torch.ones(len(batch))
    mb = MetaBatch(batch, weights.float())
    return mb.to(device) if device is not None else mb


class DomainBranch(nn.Module):
    """e_k (K x H), W_d (H x H) and, for the teacher, the domain classifier W_q (H -> K)."""

    def __init__(self, hidden_size: int, num_domains: int, dropout: float = 0.1, *, classifier: bool = True,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.hidden_size, self.num_domains = int(hidden_size), int(num_domains)
        self.embedding = nn.Embedding(num_domains, hidden_size)
        self.transform = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_domains) if classifier else None
        # BERT initialisation (the authors' branch lives inside a BertPreTrainedModel).
        for module in (self.embedding, self.transform, self.classifier):
            if module is not None:
                nn.init.normal_(module.weight, std=init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def features(self, pooled: Tensor, domain_ids: Tensor) -> Tensor:
        """r = W_d (h-bar + e_k) + b_d, [B, H] - the TKD feature (no tanh)."""
        return self.transform(pooled + self.embedding(domain_ids))

    def forward(self, pooled: Tensor, domain_ids: Tensor) -> tuple[Tensor, Tensor]:
        if self.classifier is None:
            raise HRKDError("this domain branch has no domain classifier (a student's); call features()")
        r = self.features(pooled, domain_ids)
        return r, self.classifier(self.dropout(torch.tanh(r)))


class MetaTeacherObjective(nn.Module):
    """The meta-teacher's trainable module: single-head classifier + domain branch; ``forward(MetaBatch)``.

    ``scores`` are the per-domain t tensors of :func:`hrkd.metakd.scores.load_scores` (a plain
    list: not parameters, not in the state dict).
    """

    def __init__(self, model: nn.Module, domains: Sequence[str], settings, scores: Sequence[Tensor] | None) -> None:
        super().__init__()
        if len(model.heads) != 1:
            raise HRKDError("the meta-teacher has one head over all domains (mix-style); build it with domains=None")
        if settings.sample_weights and scores is None:
            raise HRKDError("the meta-teacher weights rows by their transferability scores: run "
                            "`dvc repro metakd_scores@<task>` first, or set metakd.teacher.sample_weights=false")
        if scores is not None and len(scores) != len(domains):
            raise HRKDError(f"got scores for {len(scores)} domains but the task has {len(domains)}; rerun metakd_scores")
        self.model = model
        self.domains = list(domains)
        self.settings = settings
        cfg = model.config
        dropout = settings.branch_dropout if settings.branch_dropout is not None else cfg.hidden_dropout_prob
        self.branch = DomainBranch(model.hidden_size, len(self.domains), dropout,
                                   init_std=getattr(cfg, "initializer_range", 0.02))
        self.gamma1 = float(settings.domain_loss_weight)
        self.scores = list(scores) if scores is not None and settings.sample_weights else None

    def batch_maker(self, task: TaskSplits, device: torch.device) -> Callable[[Step], MetaBatch]:
        def make_batch(step: Step) -> MetaBatch:
            return make_meta_batch(task, "train", step, self.scores, device)

        return make_batch

    def forward(self, mb: MetaBatch) -> tuple[Tensor, dict[str, Tensor]]:
        b = mb.batch
        out = self.model(b.input_ids, b.attention_mask, b.token_type_ids)
        q = corrupted = None
        if self.gamma1:
            pooled = masked_positions_mean(out.last_hidden, b.attention_mask if self.settings.mask_padding else None)
            _, q = self.branch(pooled, b.domain_ids)
            # z~: the batch's own domain ids in random order (global RNG: seeded and resumed by the engine).
            corrupted = b.domain_ids[torch.randperm(len(b), device=b.domain_ids.device)]
        loss, ce, da = meta_teacher_loss(out.logits, b.labels, q, corrupted, mb.weights, self.gamma1)
        return loss, {"ce": ce.detach(), "domain": da.detach(), "t_mean": mb.weights.detach().mean()}

    def fingerprint_config(self) -> dict[str, Any]:
        """What else a resume state must match: the branch settings and the scores it was trained with."""
        digest = hashlib.sha256()
        for t in self.scores or []:
            digest.update(t.numpy().tobytes())
        return {"metakd": self.settings.model_dump(), "scores": digest.hexdigest()[:16] if self.scores else None}

    def save_extra(self, out_dir: str | Path) -> None:
        """Meta-distillation's TKD target needs the branch next to each saved teacher checkpoint."""
        save_branch(self.branch, out_dir, {"domains": self.domains, "mask_padding": self.settings.mask_padding,
                                           "domain_loss_weight": self.gamma1,
                                           "sample_weights": self.settings.sample_weights})


def train_meta_teacher(*, task: TaskSplits, params, scores: Sequence[Tensor] | None, **kwargs) -> dict[str, Any]:
    """Train the meta-teacher (teacher kind ``meta``): :func:`hrkd.teachers.train_teacher` with this objective.

    ``scores``: the transferability scores of the training rows (:func:`hrkd.metakd.scores.load_scores`).
    """
    def make_objective(model: nn.Module) -> MetaTeacherObjective:
        return MetaTeacherObjective(model, task.domains, params.metakd.teacher, scores)

    return train_teacher(kind="meta", task=task, params=params, make_objective=make_objective, **kwargs)


def save_branch(branch: DomainBranch, out_dir: str | Path, metadata: dict[str, Any]) -> None:
    """Write the branch weights + constructor arguments into an (already staged) teacher folder."""
    from safetensors.torch import save_file


    out_dir = Path(out_dir)
    save_file({k: v.detach().contiguous().cpu() for k, v in branch.state_dict().items()}, str(out_dir / BRANCH_WEIGHTS))
    write_json(out_dir / BRANCH_META, {"hidden_size": branch.hidden_size, "num_domains": branch.num_domains,
                                       "dropout": branch.dropout.p, "classifier": branch.classifier is not None,
                                       **metadata})


def load_branch(teacher_dir: str | Path) -> tuple[DomainBranch, dict[str, Any]]:
    """The meta-teacher's domain branch saved next to a classifier (frozen, eval mode) and its metadata."""
    from safetensors.torch import load_file


    teacher_dir = Path(teacher_dir)
    if not (teacher_dir / BRANCH_META).is_file() or not (teacher_dir / BRANCH_WEIGHTS).is_file():
        raise HRKDError(f"{teacher_dir} has no Meta-KD domain branch ({BRANCH_WEIGHTS}): it is not a meta-teacher; "
                        "run `dvc repro train_meta_teacher` first")
    meta = read_json(teacher_dir / BRANCH_META)
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the caller's RNG
        branch = DomainBranch(meta["hidden_size"], meta["num_domains"], meta["dropout"], classifier=meta["classifier"])
    branch.load_state_dict(load_file(str(teacher_dir / BRANCH_WEIGHTS)))
    return branch.eval().requires_grad_(False), meta
