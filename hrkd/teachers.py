"""The four teacher kinds of section 3.2 (Tables 2-3) on top of the shared engine.

* ``single`` - one model per domain, trained on that domain only (BERT_B-single);
* ``mix``    - one model, one head, all domains pooled and shuffled (BERT_B-mix);
* ``mtl``    - shared encoder, per-domain heads, each batch from one domain, domains visited in
               proportion to their size (BERT_B-mtl, MT-DNN);
* ``hrkd``   - shared encoder, per-domain heads, every step one batch from every domain with
               their losses summed (HRKD-teacher, section 2.1);
* ``meta``   - the Meta-KD meta-teacher: ``mix`` plus a domain branch and per-row transferability
               weights (:mod:`hrkd.metakd.teacher`; its own stage, train_meta_teacher).

Every kind ends with one selected checkpoint per domain (best dev accuracy, as the authors
select) saved as a plain ``BertForSequenceClassification`` directory.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hrkd.config import Params, TrainSettings
from hrkd.data.loading import Batch, Schedule, TaskSplits, collate, eval_batches
from hrkd.engine import SHARED, Runtime, Trainer, discard_resume, seed_everything
from hrkd.io import atomic_dir, write_json

log = logging.getLogger("hrkd.teachers")

MULTI_HEAD = {"single": False, "mix": False, "mtl": True, "hrkd": True, "meta": False}
SCHEDULE = {"single": "single", "mix": "mix", "mtl": "mtl", "hrkd": "parallel", "meta": "mix"}


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


@torch.inference_mode()
def domain_accuracy(model: nn.Module, task: TaskSplits, split: str, domain: int, batch_size: int,
                    runtime: Runtime, multi_head: bool) -> float:
    correct = total = 0
    for batch in eval_batches(task, split, domain, batch_size):
        batch = batch.to(runtime.device)
        with runtime.autocast():
            logits = model(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                           domain=domain if multi_head else None).logits
        correct += int((logits.argmax(-1) == batch.labels).sum())
        total += len(batch)
    return correct / total if total else float("nan")


def save_selected(
    *, trainer: Trainer, result, restore, model: nn.Module, task: TaskSplits, domain: int, head: int,
    out_dir: Path, tokenizer: Any, batch_size: int, runtime: Runtime, multi_head: bool, metadata: dict[str, Any],
) -> dict[str, Any]:
    """Restore the checkpoint selected for ``domain``, test it, and save it as a plain classifier.

    ``restore`` loads a best-state snapshot into the trained module (the snapshot's layout is the
    method's business); returns the selection record {"dev", "test", "step"} for the metrics.
    """
    from hrkd.models import save_domain_classifier

    name = task.domains[domain]
    restore(trainer.best_state(name))
    test = domain_accuracy(model, task, "test", domain, batch_size, runtime, multi_head)
    sel = result.best[name]
    save_domain_classifier(
        model, head, out_dir / name, tokenizer=tokenizer, labels=task.labels,
        metadata={**metadata, "domain": name, "selected_step": sel.step, "dev_accuracy": sel.dev,
                  "test_accuracy": test},
    )
    return {"dev": sel.dev, "test": test, "step": sel.step}


@dataclass(frozen=True)
class RunPaths:
    out: Path
    metrics: Path
    live: Path | None
    resume: Path


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
    stop_at_step: int | None = None,
    scores: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train one teacher kind on ``task`` and write per-domain checkpoints plus metrics.

    ``scores``: the Meta-KD transferability scores of the training rows (kind ``meta`` only;
    :func:`hrkd.metakd.scores.load_scores`).
    """
    from hrkd.models import MultiDomainBert, save_domain_classifier

    meta = kind == "meta"
    settings = settings or (params.active.meta_teacher if meta else params.active.teacher)
    multi = MULTI_HEAD[kind]
    D = len(task.domains)
    # Written only when distillation will read it: at paper scale it doubles the teacher's disk use.
    save_shared = kind != "single" and params.distill.teacher_checkpoint == "shared"
    selected: dict[str, dict[str, Any]] = {}
    # Only the main process writes; the staging folder replaces paths.out once everything is saved.
    staging = atomic_dir(paths.out) if runtime.is_main else contextlib.nullcontext(None)
    with staging as tmp:
        # single trains one model per domain; the other kinds train one model over all domains.
        runs = [(d, [d]) for d in range(D)] if kind == "single" else [(None, list(range(D)))]
        for run_domain, eval_domains in runs:
            tag = task.domains[run_domain] if run_domain is not None else None
            seed_everything(params.teacher.seed)
            model = MultiDomainBert.from_pretrained(pretrained, num_labels=len(task.labels),
                                                    domains=task.domains if multi else None)
            if meta:
                from hrkd.metakd.teacher import MetaTeacherObjective

                objective = MetaTeacherObjective(model, task.domains, params.metakd.teacher, scores)
            else:
                objective = ClassifierObjective(model, D, multi_head=multi, sum_domains=kind == "hrkd")
            schedule = Schedule(kind=SCHEDULE[kind], sizes=tuple(task.sizes("train")),
                                batch_size=settings.batch_size, seed=params.teacher.seed, domain=run_domain or 0)

            def make_batch(step, _device=runtime.device):
                return collate(task, "train", step).to(_device)

            if meta:  # the batch also carries each row's t_i
                make_batch = objective.batch_maker(task, runtime.device)

            def evaluate(module, _eval=tuple(eval_domains)):
                return {task.domains[d]: domain_accuracy(module.model, task, "dev", d, settings.eval_batch_size,
                                                         runtime, multi) for d in _eval}

            sub = (lambda p: p / tag) if tag else (lambda p: p)
            config = {"kind": kind, "task": task.name, "domain": tag, "settings": settings.model_dump(),
                      "seed": params.teacher.seed, "sizes": task.sizes("train"),
                      "max_seq_len": params.active.max_seq_len, "pretrained": str(pretrained), "world": runtime.world}
            if meta:
                config.update(objective.fingerprint_config())
            trainer = Trainer(
                module=objective, make_batch=make_batch, schedule=schedule, settings=settings, runtime=runtime,
                engine=params.engine, evaluate=evaluate, domains=[task.domains[d] for d in eval_domains],
                resume_dir=sub(paths.resume), live_dir=sub(paths.live) if paths.live else None, config=config,
                find_unused_parameters=kind in ("mtl", "meta"), stop_at_step=stop_at_step, select_average=save_shared,
                desc=f"teacher {task.name}/{kind}" + (f"/{tag}" if tag else ""),
            )
            result = trainer.fit()
            if runtime.is_main:
                for d in eval_domains:
                    selected[task.domains[d]] = save_selected(
                        trainer=trainer, result=result, restore=objective.load_state_dict, model=model, task=task,
                        domain=d, head=d if multi else 0, out_dir=tmp, tokenizer=tokenizer,
                        batch_size=settings.eval_batch_size, runtime=runtime, multi_head=multi,
                        metadata={"role": "teacher", "kind": kind, "task": task.name,
                                  "settings": settings.model_dump(), "seed": params.teacher.seed,
                                  "max_seq_len": params.active.max_seq_len},
                    )
                    if meta:  # meta-distillation's TKD target needs the domain branch of this checkpoint
                        objective.save_branch(tmp / task.domains[d])
                if save_shared:
                    # The documented alternative to per-domain selection: one checkpoint for all domains.
                    objective.load_state_dict(trainer.best_state(SHARED))
                    for d, name in enumerate(task.domains):
                        save_domain_classifier(
                            model, d if multi else 0, tmp / SHARED / name, tokenizer=tokenizer, labels=task.labels,
                            metadata={"role": "teacher", "kind": kind, "task": task.name, "domain": name,
                                      "selected_step": result.best[SHARED].step, "selection": "average dev accuracy",
                                      "dev_average": result.best[SHARED].dev, "seed": params.teacher.seed},
                        )
                        if meta:
                            objective.save_branch(tmp / SHARED / name)
            trainer.finish()
        if not runtime.is_main:
            return {}
        metrics = _summarise(selected, task.domains)
        write_json(tmp / "teacher.json", {"kind": kind, "task": task.name, "domains": task.domains,
                                          "labels": task.labels, "metrics": metrics})
    write_json(paths.metrics, metrics)
    discard_resume(paths.resume, runtime)
    log.info("teacher %s/%s test accuracy: %s", task.name, kind,
             " ".join(f"{d}={metrics['test'][d]:.4f}" for d in task.domains) + f" avg={metrics['test']['average']:.4f}")
    return metrics


def _summarise(selected: dict[str, dict[str, Any]], domains: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"dev": {}, "test": {}, "step": {}}
    for d in domains:
        out["dev"][d] = round(selected[d]["dev"], 6)
        out["test"][d] = round(selected[d]["test"], 6)
        out["step"][d] = selected[d]["step"]
    for split in ("dev", "test"):
        out[split]["average"] = round(sum(out[split][d] for d in domains) / len(domains), 6)
    return out
