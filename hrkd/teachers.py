"""The four teacher kinds of section 3.2 (Tables 2-3) on top of the shared engine.

* ``single`` - one model per domain, trained on that domain only (BERT_B-single);
* ``mix``    - one model, one head, all domains pooled and shuffled (BERT_B-mix);
* ``mtl``    - shared encoder, per-domain heads, each batch from one domain, domains visited in
               proportion to their size (BERT_B-mtl, MT-DNN);
* ``hrkd``   - shared encoder, per-domain heads, every step one batch from every domain with
               their losses summed (HRKD-teacher, section 2.1);
* ``meta``   - the Meta-KD meta-teacher: ``mix`` plus a domain branch and per-row transferability
               weights (:mod:`hrkd.metakd.teacher` supplies its objective; its own stage,
               train_meta_teacher).

How each kind trains is data (:data:`hrkd.registry.TEACHERS`); what a run does around the
training loop is :mod:`hrkd.driver`.

Every kind ends with one selected checkpoint per domain (best dev accuracy, as the authors
select) saved as a plain ``BertForSequenceClassification`` directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hrkd.config import Params, TrainSettings
from hrkd.data.loading import Batch, Schedule, Step, TaskSplits, collate
from hrkd.driver import Context, Run, RunPaths, drive
from hrkd.engine import SHARED, Callback, Runtime, seed_everything
from hrkd.errors import HRKDError
from hrkd.models import MultiDomainBert, save_domain_classifier
from hrkd.registry import TEACHERS, teacher_kind

log = logging.getLogger("hrkd.teachers")


def per_domain_summed_ce(logits: torch.Tensor, labels: torch.Tensor, domain_ids: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Sum over domains of each domain's mean cross-entropy (section 2.1: optimise domains simultaneously)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    sums = torch.zeros(num_domains, device=ce.device).index_add_(0, domain_ids, ce)
    counts = torch.bincount(domain_ids, minlength=num_domains).clamp(min=1)
    present = torch.bincount(domain_ids, minlength=num_domains) > 0
    return (sums / counts)[present].sum()


class ClassifierObjective(nn.Module):
    """Supervised fine-tuning loss of a (multi-head) classifier; the engine's trainable module."""

    def __init__(self, model: nn.Module, num_domains: int, multi_head: bool, sum_domains: bool) -> None:
        super().__init__()
        self.model = model
        self.num_domains = num_domains
        self.multi_head = multi_head
        self.sum_domains = sum_domains

    def batch_maker(self, task: TaskSplits, device: torch.device) -> Callable[[Step], Batch]:
        def make_batch(step: Step) -> Batch:
            return collate(task, "train", step).to(device)

        return make_batch

    def fingerprint_config(self) -> dict[str, Any]:
        """Nothing beyond the teacher's own config decides whether a resume state is this run's."""
        return {}

    def save_extra(self, out_dir: Path) -> None:
        """A plain classifier folder is all this teacher leaves."""

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model(
            batch.input_ids,
            batch.attention_mask,
            batch.token_type_ids,
            domain=batch.domain_ids if self.multi_head else None,
        )
        if self.sum_domains:
            return per_domain_summed_ce(out.logits, batch.labels, batch.domain_ids, self.num_domains), {}
        return F.cross_entropy(out.logits.float(), batch.labels), {}


@dataclass
class TeacherPlan:
    """One teacher kind on one task, for :func:`hrkd.driver.drive`.

    ``make_objective(model)`` builds the trainable module around a fresh model (default:
    :class:`ClassifierObjective`); a kind that trains more than the classifier (Meta-KD's
    meta-teacher, :mod:`hrkd.metakd.teacher`) passes its own. Either offers what
    :class:`ClassifierObjective` does: ``batch_maker(task, device)``, ``fingerprint_config()``
    and ``save_extra(folder)``.
    """

    kind: str
    task: TaskSplits
    params: Params
    pretrained: Path
    runtime: Runtime
    settings: TrainSettings
    tokenizer: Any
    make_objective: Callable[[nn.Module], nn.Module] | None = None
    role: str = "teacher"

    @property
    def label(self) -> str:
        return f"teacher {self.task.name}/{self.kind}"

    @property
    def save_shared(self) -> bool:
        # Written only when distillation will read it: at paper scale it doubles the teacher's disk use.
        return not TEACHERS[self.kind].per_domain and self.params.distill.teacher_checkpoint == "shared"

    def runs(self, ctx: Context) -> Iterator[Run]:
        kind, task, params, settings = TEACHERS[self.kind], self.task, self.params, self.settings
        D = len(task.domains)
        # single trains one model per domain; the other kinds train one model over all domains.
        groups = [(d, [d]) for d in range(D)] if kind.per_domain else [(None, list(range(D)))]
        for run_domain, domains in groups:
            tag = task.domains[run_domain] if run_domain is not None else None
            seed_everything(params.teacher.seed)
            model = MultiDomainBert.from_pretrained(self.pretrained, num_labels=len(task.labels),
                                                    domains=task.domains if kind.multi_head else None)
            objective = (self.make_objective(model) if self.make_objective is not None
                         else ClassifierObjective(model, D, multi_head=kind.multi_head, sum_domains=kind.sum_domains))
            make_batch = objective.batch_maker(task, self.runtime.device)
            config = {"kind": self.kind, "task": task.name, "domain": tag, "settings": settings.model_dump(),
                      "seed": params.teacher.seed, "sizes": task.sizes("train"),
                      "max_seq_len": params.active.max_seq_len, "pretrained": str(self.pretrained),
                      "world": self.runtime.world}
            config.update(objective.fingerprint_config())
            yield Run(
                module=objective, model=model, make_batch=make_batch,
                schedule=Schedule(kind=kind.schedule, sizes=tuple(task.sizes("train")),
                                  batch_size=settings.batch_size, seed=params.teacher.seed, domain=run_domain or 0,
                                  lengths=task.lengths("train"), group_by_length=settings.group_by_length),
                settings=settings, domains=domains, config=config, multi_head=kind.multi_head,
                desc=self.label + (f"/{tag}" if tag else ""), find_unused_parameters=kind.unused_parameters,
                select_average=self.save_shared, subdir=tag, save_with=objective.save_extra,
                after=self._save_shared(objective, model) if self.save_shared else None,
            )
            del objective, model

    def _save_shared(self, objective: nn.Module, model: nn.Module):
        def after(trainer, result, staging: Path) -> None:
            # The documented alternative to per-domain selection: one checkpoint for all domains.
            objective.load_state_dict(trainer.best_state(SHARED))
            multi = TEACHERS[self.kind].multi_head
            for d, name in enumerate(self.task.domains):
                save_domain_classifier(
                    model, d if multi else 0, staging / SHARED / name, tokenizer=self.tokenizer,
                    labels=self.task.labels,
                    metadata={"role": "teacher", "kind": self.kind, "task": self.task.name, "domain": name,
                              "selected_step": result.best[SHARED].step, "selection": "average dev accuracy",
                              "dev_average": result.best[SHARED].dev, "seed": self.params.teacher.seed,
                              "max_seq_len": self.params.active.max_seq_len},
                )
                objective.save_extra(staging / SHARED / name)

        return after

    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"kind": self.kind, "task": self.task.name, "domains": self.task.domains, "labels": self.task.labels,
                "metrics": metrics}


def train_teacher(
    *,
    kind: str,
    task: TaskSplits,
    params: Params,
    pretrained: Path,
    tokenizer: Any,
    runtime: Runtime,
    paths: RunPaths,
    settings: TrainSettings | None = None,
    make_objective: Callable[[nn.Module], nn.Module] | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train one teacher kind on ``task`` and write per-domain checkpoints plus metrics.

    ``make_objective``: see :class:`TeacherPlan` (Meta-KD's meta-teacher:
    :func:`hrkd.metakd.teacher.train_meta_teacher`).
    """
    kind_ = teacher_kind(kind)
    if kind_.metakd and make_objective is None:
        raise HRKDError("the meta-teacher trains through hrkd.metakd.teacher.train_meta_teacher "
                        "(`python pipeline/train_teacher.py --kind meta`)")
    settings = settings or (params.active.meta_teacher if kind_.metakd else params.active.teacher)
    plan = TeacherPlan(kind, task, params, Path(pretrained), runtime, settings, tokenizer, make_objective)
    return drive(plan, task=task, tokenizer=tokenizer, runtime=runtime, engine=params.engine, paths=paths,
                 metadata={"role": "teacher", "kind": kind, "task": task.name, "settings": settings.model_dump(),
                           "seed": params.teacher.seed, "max_seq_len": params.active.max_seq_len},
                 callbacks=callbacks)
