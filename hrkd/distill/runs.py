"""Distillation runs (Tables 2-4) on top of the shared engine, mirroring :mod:`hrkd.teachers`.

* ``tinybert-kd`` - one single-head student per domain, trained on that domain only and
  distilled from that domain's teacher checkpoint (eq. 5 with D = 1);
* ``multi-domain-kd`` / ``no-domain-rel`` - one student, shared encoder + per-domain heads, every
  step one batch of every domain, eq. 5 (the two names are the same computation);
* ``hrkd`` and its ablations ``no-self-attention``, ``no-comp-agg``, ``no-hierarchical`` - the
  same student and schedule, eq. 17 with ratios from the relational graph;
* ``metakd`` - Meta-KD (Pan et al. 2021) from the ``meta`` teacher, one student per domain
  (:mod:`hrkd.metakd.distill`).

Every run ends with one selected student per domain (best dev accuracy) saved as a plain
``BertForSequenceClassification`` directory under ``<out>/<domain>/``; HRKD methods also save
``<out>/_relational/`` (student encoder at the best average-dev step + graph state).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from hrkd.config import Params, StudentSettings
from hrkd.data.loading import Schedule, TaskSplits, collate, shard
from hrkd.distill.objective import (
    HRKD_METHODS,
    RELATIONAL_DIR,
    KDObjective,
    check_method,
    load_teachers,
    make_distill_batch,
    relational_ratios,
    save_relational,
    teacher_checkpoints,
)
from hrkd.engine import SHARED, Runtime, Trainer, discard_resume, seed_everything
from hrkd.errors import HRKDError
from hrkd.io import atomic_dir, write_json
from hrkd.relational import regime_counts, regime_of_counts
from hrkd.teachers import RunPaths, _summarise, domain_accuracy, save_selected

log = logging.getLogger("hrkd.distill")

DIAGNOSTIC_KEYS = ("mean_spread", "mean_normalised_entropy", "mean_max_abs_dev")
METAKD = "metakd"  # Meta-KD: only from the meta-teacher, run by hrkd.metakd.distill


def run_name(method: str, teacher_kind: str) -> str:
    """Output name of a run: ``<teacher>-tinybert-kd``; the method for HRKD-teacher students, else ``<teacher>-<method>``.

    ``metakd`` (only from the ``meta`` teacher) is named ``metakd``.
    """
    if method == METAKD:
        if teacher_kind != "meta":
            raise HRKDError(f"method metakd distils from the meta-teacher: use --teacher meta (got '{teacher_kind}')")
        return METAKD
    check_method(method, teacher_kind)
    if method == "tinybert-kd" or teacher_kind != "hrkd":
        return f"{teacher_kind}-{method}"
    return method


def student_settings(params: Params, task: str, fewshot: bool = False) -> StudentSettings:
    """The active profile's student schedule with the run's learning rate (``Params.student_lr`` precedence)."""
    settings = params.active.student
    return settings.model_copy(update={"lr": params.student_lr(task, fewshot)})


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
    stop_at_step: int | None = None,
    scores: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Distil one student (or, for tinybert-kd and metakd, one per domain) and write checkpoints plus metrics.

    ``scores``: Meta-KD transferability scores of the training rows (method ``metakd`` only,
    :func:`hrkd.metakd.scores.load_scores`); ``settings`` does not apply to it (two schedules,
    :func:`hrkd.metakd.distill.metakd_settings`).
    """
    from hrkd.models import MultiDomainBert

    if method == METAKD:
        from hrkd.metakd.distill import distill_metakd

        run_name(method, teacher_kind)
        if scores is None:
            raise HRKDError(f"metakd needs the transferability scores: run `dvc repro metakd_scores@{task.name}` "
                            "and pass them (scores=load_scores(...))")
        return distill_metakd(task=task, params=params, seed=seed, teacher_dir=teacher_dir,
                              pretrained_student=pretrained_student, tokenizer=tokenizer, runtime=runtime, paths=paths,
                              scores=scores, fewshot=fewshot, stop_at_step=stop_at_step)
    check_method(method, teacher_kind)
    settings = settings or student_settings(params, task.name, fewshot)
    distill = params.distill
    run_seed = seed + distill.seed_offset
    single = method == "tinybert-kd"
    multi = not single
    hrkd = method in HRKD_METHODS
    name = run_name(method, teacher_kind)
    D = len(task.domains)
    # Fail on a missing teacher before any training starts.
    checkpoints = teacher_checkpoints(teacher_dir, task.name, teacher_kind, task.domains, distill.teacher_checkpoint)
    selected: dict[str, dict[str, Any]] = {}
    relational: dict[str, Any] = {}
    staging = atomic_dir(paths.out) if runtime.is_main else contextlib.nullcontext(None)
    with staging as tmp:
        runs = [(d, [d]) for d in range(D)] if single else [(None, list(range(D)))]
        for run_domain, domains in runs:
            tag = task.domains[run_domain] if run_domain is not None else None
            teachers = load_teachers({task.domains[d]: checkpoints[task.domains[d]] for d in domains},
                                     len(task.labels), runtime.device)
            teacher_cfg = teachers[0].model.config
            # Seed right before the student, projections and graph are built: runs are reproducible.
            seed_everything(run_seed)
            student = MultiDomainBert.from_pretrained(pretrained_student, num_labels=len(task.labels),
                                                      domains=task.domains if multi else None)
            objective = KDObjective(student, teachers, num_domains=len(domains), method=method, distill=distill,
                                    teacher_layers=int(teacher_cfg.num_hidden_layers),
                                    teacher_hidden=int(teacher_cfg.hidden_size))
            # No batch is wider than the longest training row (collate trims to it).
            width = max(int(task.splits[task.domains[d]]["train"].lengths.max()) for d in domains)
            objective.ratio_watch_every = params.engine.log_every if runtime.is_main else 0
            objective.enable_teacher_cache([task.sizes("train")[d] for d in domains], width,
                                           params.engine.teacher_cache_gib)
            schedule = Schedule(kind="single" if single else "parallel", sizes=tuple(task.sizes("train")),
                                batch_size=settings.batch_size, seed=run_seed, domain=run_domain or 0)

            def make_batch(step, _domains=tuple(domains)):
                return make_distill_batch(task, "train", shard(step, runtime.rank, runtime.world), _domains,
                                          runtime.device)

            def evaluate(module, _domains=tuple(domains)):
                return {task.domains[d]: domain_accuracy(module.student, task, "dev", d, settings.eval_batch_size,
                                                         runtime, multi) for d in _domains}

            sub = (lambda p: p / tag) if tag else (lambda p: p)
            config = {"method": method, "teacher": teacher_kind, "task": task.name, "domain": tag,
                      "settings": settings.model_dump(), "distill": distill.model_dump(), "seed": run_seed,
                      "sizes": task.sizes("train"), "max_seq_len": params.active.max_seq_len, "fewshot": fewshot,
                      "teachers": {d: str(p) for d, p in checkpoints.items()}, "pretrained": str(pretrained_student),
                      "world": runtime.world}
            trainer = Trainer(
                module=objective, make_batch=make_batch, schedule=schedule, settings=settings, runtime=runtime,
                engine=params.engine, evaluate=evaluate, domains=[task.domains[d] for d in domains],
                resume_dir=sub(paths.resume), live_dir=sub(paths.live) if paths.live else None, config=config,
                snapshot=lambda m: m.snapshot_state(), select_average=hrkd, stop_at_step=stop_at_step,
                desc=f"student {task.name}/{name}" + (f"/{tag}" if tag else ""),
            )
            result = trainer.fit()
            if runtime.is_main:
                meta = {"role": "student", "method": method, "teacher": teacher_kind, "run": name, "task": task.name,
                        "seed": seed, "fewshot": fewshot, "settings": settings.model_dump(),
                        "distill": distill.model_dump(), "max_seq_len": params.active.max_seq_len}
                for d in domains:
                    selected[task.domains[d]] = save_selected(
                        trainer=trainer, result=result, restore=objective.load_snapshot, model=student, task=task,
                        domain=d, head=d if multi else 0, out_dir=tmp, tokenizer=tokenizer,
                        batch_size=settings.eval_batch_size, runtime=runtime, multi_head=multi, metadata=meta,
                    )
                if hrkd:
                    # One encoder + graph for the case studies: the step with the best average dev accuracy.
                    objective.load_snapshot(trainer.best_state(SHARED))
                    save_relational(objective, tmp / RELATIONAL_DIR, tokenizer,
                                    {**meta, "domains": task.domains, "selected_step": result.best[SHARED].step,
                                     "selection": "average dev accuracy", "dev_average": result.best[SHARED].dev})
                    relational = final_ratio_diagnostics(objective, task, settings.batch_size, runtime, run_seed)
            trainer.finish()
            del objective, teachers, student
        if not runtime.is_main:
            return {}
        metrics = _summarise(selected, task.domains)
        if relational:
            metrics["ratios"] = {mode: {**{k: round(relational[mode]["diagnostics"][k], 6) for k in DIAGNOSTIC_KEYS},
                                        **regime_counts(relational[mode]["ratios"])}
                                 for mode in ("eval", "train_mode")}
        write_json(tmp / "student.json", {
            "method": method, "teacher": teacher_kind, "run": name, "task": task.name, "seed": seed,
            "domains": task.domains, "labels": task.labels, "lr": settings.lr, "fewshot": fewshot, "metrics": metrics,
            **({"ratios": {mode: {"ratios": v["ratios"].tolist(), **v["diagnostics"]} for mode, v in relational.items()}}
               if relational else {}),
        })
    write_json(paths.metrics, metrics)
    discard_resume(paths.resume, runtime)
    log.info("student %s/%s test accuracy: %s", task.name, name,
             " ".join(f"{d}={metrics['test'][d]:.4f}" for d in task.domains) + f" avg={metrics['test']['average']:.4f}")
    if relational:
        for mode, what in (("eval", "eval mode"), ("train_mode", "graph dropout on")):
            regime = regime_of_counts(metrics["ratios"][mode])
            if regime != "learned":
                log.warning("the selected student's ratios are %s (%s, dev batch): %s", regime, what,
                            "eq. 17 reduces to eq. 5 / D" if regime == "uniform"
                            else "intermediate KD is off for all but one domain in some layer")
        log.info("ratios (dev batch): eval-mode mean spread %.2e, normalised entropy %.4f; with graph dropout %.2e, %.4f",
                 metrics["ratios"]["eval"]["mean_spread"], metrics["ratios"]["eval"]["mean_normalised_entropy"],
                 metrics["ratios"]["train_mode"]["mean_spread"], metrics["ratios"]["train_mode"]["mean_normalised_entropy"])
    return metrics


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
