"""The run driver: what every training stage does around :meth:`hrkd.engine.Trainer.fit`.

A stage (a teacher kind, a distillation method, Meta-KD) is a :class:`Plan`: it yields the
:class:`Run` s it needs, one at a time (each builds its model only when the previous one is
done, seeded right before), and supplies only what differs - model, objective, batches, what
else to save. The driver owns the rest, once for everyone:

* the outputs appear atomically, written by the main process only (a staging folder replaces
  ``paths.out`` when everything is saved);
* the dev evaluation, and per domain the best dev checkpoint restored, tested on the test split
  and saved as a plain classifier whose ``hrkd.json`` holds the run's config record;
* the metrics file (dvc metrics), the summary JSON next to the models, the log line, and
  deleting the resume scratch once the stage succeeded.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from hrkd.config import Engine, TrainSettings
from hrkd.data.loading import Schedule, Step, TaskSplits, eval_batches
from hrkd.engine import Callback, Job, Place, Runtime, Trainer, TrainResult, discard_resume
from hrkd.io import atomic_dir, write_json
from hrkd.models import save_domain_classifier

log = logging.getLogger("hrkd.driver")


@dataclass(frozen=True)
class RunPaths:
    """A stage's outputs (``out``, ``metrics``, ``live``: DVC's) and its resume scratch (not DVC's)."""

    out: Path
    metrics: Path
    live: Path | None
    resume: Path


@dataclass
class Run:
    """One optimisation of a stage, as its :class:`Plan` supplies it.

    ``model`` is the classifier inside ``module`` whose heads are evaluated and saved; ``domains``
    the task's domain indices this run selects a checkpoint for (all of them for a pooled run);
    ``restore`` loads a best-checkpoint snapshot back into ``module``; ``subdir`` places the run's
    resume and DVCLive folders (a per-domain run: the domain's name); ``save_with(folder)`` adds
    to each saved classifier folder, with that domain's checkpoint loaded; ``after(trainer,
    result, staging)`` writes what else the run keeps (main process, after the per-domain saves).
    """

    module: nn.Module
    model: nn.Module
    make_batch: Callable[[Step], Any]
    schedule: Schedule
    settings: TrainSettings
    domains: Sequence[int]
    config: dict[str, Any]
    desc: str
    multi_head: bool = False
    restore: Callable[[Mapping[str, torch.Tensor]], None] | None = None
    snapshot: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    find_unused_parameters: bool = False
    select_average: bool = False
    subdir: str | None = None
    save_with: Callable[[Path], None] | None = None
    after: Callable[[Trainer, TrainResult, Path], None] | None = None


@dataclass
class Context:
    """What a plan may use while it yields runs: the process and its folders."""

    task: TaskSplits
    runtime: Runtime
    engine: Engine
    paths: RunPaths
    callbacks: tuple[Callback, ...] = ()

    def place(self, subdir: str | None) -> Place:
        def sub(p: Path) -> Path:
            return p / subdir if subdir else p

        return Place(self.runtime, self.engine, sub(self.paths.resume),
                     sub(self.paths.live) if self.paths.live is not None else None)

    def fit(self, job: Job, subdir: str | None) -> tuple[Trainer, TrainResult]:
        """Train a job that is not one of the plan's runs (e.g. Meta-KD's stage A); the caller finishes it."""
        trainer = Trainer(job, self.place(subdir), self.callbacks)
        return trainer, trainer.fit()


class Plan(Protocol):
    """A training stage: what it trains (``runs``) and what its summary says."""

    role: str  # "teacher" | "student": the summary file is <role>.json
    label: str  # for the log, e.g. "teacher amazon/hrkd"

    def runs(self, ctx: Context) -> Iterator[Run]: ...

    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The summary JSON next to the models; may add entries to ``metrics`` (the DVC metrics file)."""
        ...


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


def job_of(run: Run, task: TaskSplits, runtime: Runtime) -> Job:
    """The engine's view of a run; the dev evaluation is the same for every stage."""

    def evaluate(module, _run=run):
        return {task.domains[d]: domain_accuracy(_run.model, task, "dev", d, _run.settings.eval_batch_size,
                                                 runtime, _run.multi_head) for d in _run.domains}

    return Job(module=run.module, make_batch=run.make_batch, schedule=run.schedule, settings=run.settings,
               evaluate=evaluate, domains=[task.domains[d] for d in run.domains], config=run.config,
               snapshot=run.snapshot, find_unused_parameters=run.find_unused_parameters,
               select_average=run.select_average, desc=run.desc)


def save_selected(run: Run, trainer: Trainer, result: TrainResult, domain: int, out_dir: Path, *,
                  task: TaskSplits, tokenizer: Any, runtime: Runtime, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Restore the checkpoint selected for ``domain``, test it, and save it as a plain classifier.

    Returns the selection record {"dev", "test", "step"} for the metrics.
    """
    name = task.domains[domain]
    (run.restore or run.module.load_state_dict)(trainer.best_state(name))
    test = domain_accuracy(run.model, task, "test", domain, run.settings.eval_batch_size, runtime, run.multi_head)
    sel = result.best[name]
    save_domain_classifier(
        run.model, domain if run.multi_head else 0, out_dir / name, tokenizer=tokenizer, labels=task.labels,
        metadata={**metadata, "domain": name, "selected_step": sel.step, "dev_accuracy": sel.dev,
                  "test_accuracy": test, "config": run.config, "fingerprint": trainer.fingerprint},
    )
    if run.save_with is not None:
        run.save_with(out_dir / name)
    return {"dev": sel.dev, "test": test, "step": sel.step}


def summarise(selected: Mapping[str, Mapping[str, Any]], domains: Sequence[str]) -> dict[str, Any]:
    """The metrics record: dev/test accuracy and selected step per domain, plus the averages."""
    out: dict[str, Any] = {"dev": {}, "test": {}, "step": {}}
    for d in domains:
        out["dev"][d] = round(selected[d]["dev"], 6)
        out["test"][d] = round(selected[d]["test"], 6)
        out["step"][d] = selected[d]["step"]
    for split in ("dev", "test"):
        out[split]["average"] = round(sum(out[split][d] for d in domains) / len(domains), 6)
    return out


def drive(plan: Plan, *, task: TaskSplits, tokenizer: Any, runtime: Runtime, engine: Engine, paths: RunPaths,
          metadata: Mapping[str, Any], callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run every optimisation of ``plan`` and write its outputs; returns the metrics (``{}`` off the main process).

    ``metadata``: what every saved classifier's ``hrkd.json`` says about the stage (role, method, ...).
    """
    ctx = Context(task, runtime, engine, paths, tuple(callbacks))
    selected: dict[str, dict[str, Any]] = {}
    staging = atomic_dir(paths.out) if runtime.is_main else contextlib.nullcontext(None)
    with staging as tmp:
        for run in plan.runs(ctx):
            trainer = Trainer(job_of(run, task, runtime), ctx.place(run.subdir), ctx.callbacks)
            result = trainer.fit()
            if runtime.is_main:
                for d in run.domains:
                    selected[task.domains[d]] = save_selected(run, trainer, result, d, tmp, task=task,
                                                              tokenizer=tokenizer, runtime=runtime, metadata=metadata)
                if run.after is not None:
                    run.after(trainer, result, tmp)
            trainer.finish()
            del trainer, run  # free the model before the plan builds the next one
        if not runtime.is_main:
            return {}
        metrics = summarise(selected, task.domains)
        write_json(tmp / f"{plan.role}.json", plan.summary(metrics))
    write_json(paths.metrics, metrics)
    discard_resume(paths.resume, runtime)
    log.info("%s test accuracy: %s", plan.label,
             " ".join(f"{d}={metrics['test'][d]:.4f}" for d in task.domains) + f" avg={metrics['test']['average']:.4f}")
    return metrics


__all__ = ["Context", "Plan", "Run", "RunPaths", "domain_accuracy", "drive", "job_of", "save_selected",
           "summarise"]
