"""Distillation runs (Tables 2-4) on top of the shared engine, as :class:`StudentPlan` s of :mod:`hrkd.driver`.

* ``tinybert-kd`` - one single-head student per domain, trained on that domain only and
  distilled from that domain's teacher checkpoint (eq. 5 with D = 1);
* ``multi-domain-kd`` / ``no-domain-rel`` - one student, shared encoder + per-domain heads, every
  step one batch of every domain, eq. 5 (the two names are the same computation);
* ``hrkd`` and its ablations ``no-self-attention``, ``no-comp-agg``, ``no-hierarchical`` - the
  same student and schedule, eq. 17 with ratios from the relational graph;
(``metakd``, Meta-KD from the ``meta`` teacher, is :mod:`hrkd.metakd.distill`; the stage
script chooses it.)

Every run ends with one selected student per domain (best dev accuracy) saved as a plain
``BertForSequenceClassification`` directory under ``<out>/<domain>/``; HRKD methods also save
``<out>/_relational/`` (student encoder at the best average-dev step + graph state).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from hrkd.config import Params, StudentSettings
from hrkd.data.loading import Schedule, TaskSplits, collate, shard
from hrkd.distill.batches import make_distill_batch
from hrkd.distill.objective import KDObjective
from hrkd.distill.ratios import RELATIONAL_DIR, relational_ratios, save_relational
from hrkd.distill.teacher_models import load_teachers, teacher_checkpoints
from hrkd.driver import Context, Run, RunPaths, drive
from hrkd.engine import SHARED, Callback, Runtime, seed_everything
from hrkd.errors import HRKDError
from hrkd.models import MultiDomainBert
from hrkd.registry import method as method_spec
from hrkd.registry import run_name
from hrkd.relational import DIAGNOSTIC_KEYS, regime_counts, regime_of_counts

log = logging.getLogger("hrkd.distill")


def student_settings(params: Params, task: str, fewshot: bool = False) -> StudentSettings:
    """The active profile's student schedule with the run's learning rate (``Params.student_lr`` precedence)."""
    settings = params.active.student
    return settings.model_copy(update={"lr": params.student_lr(task, fewshot)})


@dataclass
class StudentPlan:
    """One KD method x teacher kind x seed on one task, for :func:`hrkd.driver.drive`."""

    method: str
    teacher_kind: str
    task: TaskSplits
    params: Params
    seed: int
    checkpoints: dict[str, Path]
    pretrained: Path
    tokenizer: Any
    runtime: Runtime
    settings: StudentSettings
    fewshot: bool = False
    role: str = "student"
    relational: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return run_name(self.method, self.teacher_kind)

    @property
    def label(self) -> str:
        return f"student {self.task.name}/{self.name}"

    @property
    def run_seed(self) -> int:
        return self.seed + self.params.distill.seed_offset

    def metadata(self) -> dict[str, Any]:
        return {"role": "student", "method": self.method, "teacher": self.teacher_kind, "run": self.name,
                "task": self.task.name, "seed": self.seed, "fewshot": self.fewshot,
                "settings": self.settings.model_dump(), "distill": self.params.distill.model_dump(),
                "max_seq_len": self.params.active.max_seq_len}

    def runs(self, ctx: Context) -> Iterator[Run]:
        spec = method_spec(self.method)
        task, params, settings, runtime, distill = self.task, self.params, self.settings, self.runtime, self.params.distill
        multi = not spec.per_domain
        D = len(task.domains)
        groups = [(d, [d]) for d in range(D)] if spec.per_domain else [(None, list(range(D)))]
        for run_domain, domains in groups:
            tag = task.domains[run_domain] if run_domain is not None else None
            teachers = load_teachers({task.domains[d]: self.checkpoints[task.domains[d]] for d in domains},
                                     len(task.labels), runtime.device)
            teacher_cfg = teachers[0].model.config
            # Seed right before the student, projections and graph are built: runs are reproducible.
            seed_everything(self.run_seed)
            student = MultiDomainBert.from_pretrained(self.pretrained, num_labels=len(task.labels),
                                                      domains=task.domains if multi else None)
            objective = KDObjective(student, teachers, num_domains=len(domains), method=self.method, distill=distill,
                                    teacher_layers=int(teacher_cfg.num_hidden_layers),
                                    teacher_hidden=int(teacher_cfg.hidden_size),
                                    teacher_autocast=runtime.teacher_autocast)
            # No batch is wider than the longest training row (collate trims to it).
            width = max(int(task.splits[task.domains[d]]["train"].lengths.max()) for d in domains)
            objective.ratio_watch_every = params.engine.log_every if runtime.is_main else 0
            objective.enable_teacher_cache([task.sizes("train")[d] for d in domains], width,
                                           params.engine.teacher_cache_gib)

            def make_batch(step, _domains=tuple(domains)):
                return make_distill_batch(task, "train", shard(step, runtime.rank, runtime.world), _domains,
                                          runtime.device)

            config = {"method": self.method, "teacher": self.teacher_kind, "task": task.name, "domain": tag,
                      "settings": settings.model_dump(), "distill": distill.model_dump(), "seed": self.run_seed,
                      "sizes": task.sizes("train"), "max_seq_len": params.active.max_seq_len, "fewshot": self.fewshot,
                      "teachers": {d: str(p) for d, p in self.checkpoints.items()}, "pretrained": str(self.pretrained),
                      "world": runtime.world}
            yield Run(
                module=objective, model=student, make_batch=make_batch,
                schedule=Schedule(kind="single" if spec.per_domain else "parallel", sizes=tuple(task.sizes("train")),
                                  batch_size=settings.batch_size, seed=self.run_seed, domain=run_domain or 0,
                                  lengths=task.lengths("train"), group_by_length=settings.group_by_length),
                settings=settings, domains=domains, config=config, multi_head=multi,
                desc=self.label + (f"/{tag}" if tag else ""), restore=objective.load_snapshot,
                snapshot=lambda m: m.snapshot_state(), select_average=spec.graph, subdir=tag,
                after=self._save_relational(objective) if spec.graph else None,
            )
            del objective, teachers, student

    def _save_relational(self, objective: KDObjective):
        def after(trainer, result, staging: Path) -> None:
            # One encoder + graph for the case studies: the step with the best average dev accuracy.
            objective.load_snapshot(trainer.best_state(SHARED))
            save_relational(objective, staging / RELATIONAL_DIR, self.tokenizer,
                            {**self.metadata(), "domains": self.task.domains, "selected_step": result.best[SHARED].step,
                             "selection": "average dev accuracy", "dev_average": result.best[SHARED].dev})
            self.relational = final_ratio_diagnostics(objective, self.task, self.settings.batch_size, self.runtime,
                                                      self.run_seed)

        return after

    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        relational = self.relational
        if relational:
            metrics["ratios"] = {mode: {**{k: round(relational[mode]["diagnostics"][k], 6) for k in DIAGNOSTIC_KEYS},
                                        **regime_counts(relational[mode]["ratios"])}
                                 for mode in ("eval", "train_mode")}
            _log_regimes(metrics["ratios"])
        return {
            "method": self.method, "teacher": self.teacher_kind, "run": self.name, "task": self.task.name,
            "seed": self.seed, "domains": self.task.domains, "labels": self.task.labels, "lr": self.settings.lr,
            "fewshot": self.fewshot, "metrics": metrics,
            **({"ratios": {mode: {"ratios": v["ratios"].tolist(), **v["diagnostics"]} for mode, v in relational.items()}}
               if relational else {}),
        }


def _log_regimes(ratios: dict[str, Any]) -> None:
    for mode, what in (("eval", "eval mode"), ("train_mode", "graph dropout on")):
        regime = regime_of_counts(ratios[mode])
        if regime != "learned":
            log.warning("the selected student's ratios are %s (%s, dev batch): %s", regime, what,
                        "eq. 17 reduces to eq. 5 / D" if regime == "uniform"
                        else "intermediate KD is off for all but one domain in some layer")
    log.info("ratios (dev batch): eval-mode mean spread %.2e, normalised entropy %.4f; with graph dropout %.2e, %.4f",
             ratios["eval"]["mean_spread"], ratios["eval"]["mean_normalised_entropy"],
             ratios["train_mode"]["mean_spread"], ratios["train_mode"]["mean_normalised_entropy"])


def distill_student(
    *,
    method: str,
    teacher_kind: str,
    task: TaskSplits,
    params: Params,
    seed: int,
    teacher_dir: str | Path,
    pretrained_student: str | Path,
    tokenizer: Any,
    runtime: Runtime,
    paths: RunPaths,
    fewshot: bool = False,
    settings: StudentSettings | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Distil one student (or, for tinybert-kd, one per domain) and write checkpoints plus metrics.

    Meta-KD (method ``metakd``) is :func:`hrkd.metakd.distill.distill_metakd`.
    """
    spec = method_spec(method, teacher_kind)
    if spec.metakd:
        raise HRKDError("method metakd is meta-distillation: run it with `python pipeline/distill.py --method metakd "
                        "--teacher meta` (hrkd.metakd.distill.distill_metakd)")
    settings = settings or student_settings(params, task.name, fewshot)
    # Fail on a missing teacher before any training starts.
    checkpoints = teacher_checkpoints(teacher_dir, task.name, teacher_kind, task.domains,
                                      params.distill.teacher_checkpoint)
    plan = StudentPlan(method, teacher_kind, task, params, seed, checkpoints, Path(pretrained_student), tokenizer,
                       runtime, settings, fewshot)
    return drive(plan, task=task, tokenizer=tokenizer, runtime=runtime, engine=params.engine, paths=paths,
                 metadata=plan.metadata(), callbacks=callbacks)


def final_ratio_diagnostics(objective: KDObjective, task: TaskSplits, rows: int, runtime: Runtime,
                            seed: int) -> dict[str, dict[str, Any]]:
    """Ratios of the selected checkpoint on the first ``rows`` dev examples per domain, with and without graph dropout."""
    batches = [collate(task, "dev", [(d, torch.arange(min(rows, len(task.splits[name]["dev"]))))]).to(runtime.device)
               for d, name in enumerate(task.domains)]
    out = {"eval": relational_ratios(objective, batches)}
    with torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else []):
        torch.manual_seed(seed)  # the dropout draw is part of the reported numbers: make it reproducible
        out["train_mode"] = relational_ratios(objective, batches, graph_dropout=True)
    return out
