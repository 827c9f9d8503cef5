"""Meta-distillation (spec 1c): one student per domain from the meta-teacher (method ``metakd``).

Student k is trained on domain k's rows only (like ``tinybert-kd``), from the meta-teacher
checkpoint selected for domain k. Its loss terms, per example i:

* L_hid,i = sum_{j=0..M} MSE(W_f H^S_j, H^T_{map(j)})   (j = 0: embeddings, the paper's L_embd;
  map = :func:`hrkd.losses.uniform_layer_map`, teacher level 3j for 4 of 12 layers); ONE shared W_f;
* L_att,i = sum_{j=1..M} MSE(A^S_j, A^T_{map(j)}) on pre-softmax scores, padded keys zeroed;
* L_TKD   = MSE(W_f r^S, r^T), r = W_d (h-bar + e_k) + b_d (no tanh) - batch-averaged first (code);
  r^T from the meta-teacher's branch, r^S from the student's own random e (K x H_s) and W_d;
* lambda_i = (1 + t_i) / (1 + exp((1 - p_i)^2)), p_i = softmax(z^T_i)[y_i].

``metakd.distill.schedule``:

* ``two-stage`` (default, the authors' code): stage A minimises mean_i lambda_i (L_hid,i + L_att,i +
  gamma2 L_TKD) with a constant learning rate and keeps the last student; stage B starts from it
  and minimises the soft cross-entropy to the teacher's logits (batch mean, no lambda) with
  warmup-linear decay, keeping the best dev checkpoint;
* ``joint`` (the paper's single objective): mean_i lambda_i (L_hid,i + L_att,i + gamma2 L_TKD +
  L_pred,i) on stage B's schedule, best dev checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from hrkd.config import Params, TrainSettings
from hrkd.data.loading import Schedule, TaskSplits, shard
from hrkd.engine import Runtime, Trainer, discard_resume, fingerprint, seed_everything
from hrkd.errors import HRKDError
from hrkd.io import atomic_dir, atomic_file, read_json, write_json
from hrkd.losses import mse, soft_cross_entropy, uniform_layer_map
from hrkd.metakd.losses import (
    expertise_weights,
    masked_positions_mean,
    per_example_attention_mse,
    per_example_mse,
    per_example_soft_ce,
    weighted_mean,
)
from hrkd.metakd.teacher import DomainBranch, MetaBatch, load_branch, make_meta_batch

log = logging.getLogger("hrkd.metakd.distill")

METHOD = "metakd"
TEACHER_KIND = "meta"
STAGES = ("intermediate", "prediction", "joint")
STAGE_A_STUDENT = "student.pt"  # stage A's final student, kept only until the domain's run completes


@dataclass
class MetaTeacher:
    """A frozen meta-teacher checkpoint: classifier + domain branch (eval mode, no gradients)."""

    model: nn.Module
    branch: DomainBranch
    mask_padding: bool


def load_meta_teacher(path: str | Path, num_labels: int, domains: Sequence[str], device: torch.device) -> MetaTeacher:
    """Load one saved meta-teacher domain folder (classifier + ``metakd_branch``) for distillation."""
    from hrkd.distill.objective import load_teachers

    branch, meta = load_branch(path)
    if list(meta.get("domains", [])) != list(domains):
        raise HRKDError(f"{path} was trained on domains {meta.get('domains')} but the task has {list(domains)}; "
                        "retrain the meta-teacher on this task")
    model = load_teachers({"teacher": path}, num_labels, device)[0].model
    return MetaTeacher(model=model, branch=branch.to(device), mask_padding=bool(meta["mask_padding"]))


def metakd_settings(params: Params) -> tuple[TrainSettings, TrainSettings]:
    """(stage A, stage B) schedules of the active profile; the top-level ``lr`` overrides stage B's rate.

    Stage B (and the ``joint`` schedule) is the run that trains the deployed prediction layer, i.e.
    "the student learning rate" of every other method; stage A keeps its own constant rate.
    """
    prof = params.active
    stage_b = prof.metakd_stage_b
    if params.lr is not None:
        stage_b = stage_b.model_copy(update={"lr": params.lr})
    return prof.metakd_stage_a, stage_b


class MetaDistillObjective(nn.Module):
    """The engine's trainable module for one Meta-KD stage; ``forward(MetaBatch) -> (loss, logs)``.

    Owns the student and, for ``intermediate``/``joint``, W_f (``proj``) and the student's domain
    branch (e, W_d). The teacher sits in a plain list: not a parameter, not in state dicts,
    snapshots, resume states or DDP, and ``train()`` cannot switch its dropout on.
    """

    def __init__(self, student: nn.Module, teacher: MetaTeacher, *, stage: str, num_domains: int,
                 tkd_weight: float = 0.5, temperature: float = 1.0, class_mean: bool = False,
                 mask_queries: bool = False) -> None:
        super().__init__()
        if stage not in STAGES:
            raise HRKDError(f"unknown Meta-KD stage '{stage}': use one of {list(STAGES)}")
        self.student = student
        self.stage = stage
        self.gamma2 = float(tkd_weight)
        self.temperature = float(temperature)
        self.class_mean = class_mean
        self.mask_queries = mask_queries
        self.mask_padding = teacher.mask_padding
        self._teacher = [teacher]
        if stage == "prediction":
            return
        from hrkd.models import Taps

        tcfg = teacher.model.config
        if int(tcfg.num_attention_heads) != student.num_attention_heads:
            raise HRKDError(f"teacher has {tcfg.num_attention_heads} attention heads, the student "
                            f"{student.num_attention_heads}: L_att pairs heads one to one; use matching models")
        M, Hs, Ht = student.num_layers, student.hidden_size, int(tcfg.hidden_size)
        self.layer_map = uniform_layer_map(M, int(tcfg.num_hidden_layers))
        std = getattr(student.config, "initializer_range", 0.02)
        # W_f: one projection shared by every hidden level and by r^S (the authors' single fit_dense).
        self.proj = nn.Linear(Hs, Ht)
        nn.init.normal_(self.proj.weight, std=std)
        nn.init.zeros_(self.proj.bias)
        self.branch = DomainBranch(Hs, num_domains, classifier=False, init_std=std)
        self._student_taps = Taps(hidden=True, attention_layers=frozenset(range(1, M + 1)))
        self._teacher_taps = Taps(hidden=True, attention_layers=frozenset(self.layer_map))

    @property
    def teacher(self) -> MetaTeacher:
        return self._teacher[0]

    def forward(self, mb: MetaBatch) -> tuple[Tensor, dict[str, Tensor]]:
        b = mb.batch
        t_model = self.teacher.model
        if self.stage == "prediction":
            s = self.student(b.input_ids, b.attention_mask, b.token_type_ids)
            with torch.inference_mode():
                t_logits = t_model(b.input_ids, b.attention_mask, b.token_type_ids).logits
            loss = soft_cross_entropy(s.logits.float(), t_logits.float(), self.temperature, class_mean=self.class_mean)
            return loss, {"pred": loss.detach()}
        mask = b.attention_mask
        pool_mask = mask if self.mask_padding else None
        s = self.student(b.input_ids, mask, b.token_type_ids, taps=self._student_taps)
        with torch.inference_mode():
            t = t_model(b.input_ids, mask, b.token_type_ids, taps=self._teacher_taps)
            r_t = self.teacher.branch.features(masked_positions_mean(t.last_hidden, pool_mask), b.domain_ids)
        lam = expertise_weights(t.logits, b.labels, mb.weights)
        hid = per_example_mse(self.proj(s.embeddings), t.embeddings)
        att = torch.zeros_like(hid)
        for m, n in enumerate(self.layer_map, start=1):
            hid = hid + per_example_mse(self.proj(s.hidden_states[m - 1]), t.hidden_states[n - 1])
            att = att + per_example_attention_mse(s.attention_scores[m], t.attention_scores[n], mask,
                                                  mask_queries=self.mask_queries)
        r_s = self.branch.features(masked_positions_mean(s.last_hidden, pool_mask), b.domain_ids)
        tkd = mse(self.proj(r_s).float(), r_t.float())  # a batch scalar, as the authors compute it
        per_example = hid + att + self.gamma2 * tkd
        logs = {"hid": hid.detach().mean(), "att": att.detach().mean(), "tkd": tkd.detach(),
                "lambda": lam.detach().mean()}
        if self.stage == "joint":
            pred = per_example_soft_ce(s.logits, t.logits, self.temperature, class_mean=self.class_mean)
            per_example = per_example + pred
            logs["pred"] = pred.detach().mean()
        return weighted_mean(per_example, lam), logs

    def snapshot_state(self) -> dict[str, Tensor]:
        """What a best checkpoint keeps: the student only (W_f and the branch are dropped at inference)."""
        return {f"student.{k}": v for k, v in self.student.state_dict().items()}

    def load_snapshot(self, state: Mapping[str, Tensor]) -> None:
        self.student.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("student.")})


def distill_metakd(
    *,
    task: TaskSplits,
    params: Params,
    seed: int,
    teacher_dir: str | Path,
    pretrained_student: str | Path,
    tokenizer: Any,
    runtime: Runtime,
    paths,
    scores: Sequence[Tensor],
    fewshot: bool = False,
    settings: tuple[TrainSettings, TrainSettings] | None = None,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Meta-distil one student per domain; write ``paths.out/<domain>/`` classifiers, ``student.json`` and metrics.

    ``scores``: per-domain t tensors (:func:`hrkd.metakd.scores.load_scores`); ``paths``: a
    :class:`hrkd.teachers.RunPaths`; ``settings``: (stage A, stage B), default :func:`metakd_settings`.
    """
    from hrkd.distill.objective import teacher_checkpoints
    from hrkd.models import MultiDomainBert
    from hrkd.teachers import _summarise, domain_accuracy, save_selected

    stage_a, stage_b = settings or metakd_settings(params)
    opts = params.metakd.distill
    run_seed = seed + params.distill.seed_offset
    D = len(task.domains)
    if len(scores) != D or any(len(scores[d]) != n for d, n in enumerate(task.sizes("train"))):
        raise HRKDError("the transferability scores do not match the task's training rows; "
                        f"rerun `dvc repro metakd_scores@{task.name}`")
    teacher_dir = Path(teacher_dir)
    if not any((teacher_dir / d / "config.json").is_file() for d in task.domains):
        raise HRKDError(f"no meta-teacher in {teacher_dir}: run `dvc repro train_meta_teacher@{task.name}` first")
    checkpoints = teacher_checkpoints(teacher_dir, task.name, TEACHER_KIND, task.domains, params.distill.teacher_checkpoint)
    two_stage = opts.schedule == "two-stage"
    selected: dict[str, dict[str, Any]] = {}
    staging = atomic_dir(paths.out) if runtime.is_main else contextlib.nullcontext(None)
    with staging as tmp:
        for d, dname in enumerate(task.domains):
            teacher = load_meta_teacher(checkpoints[dname], len(task.labels), task.domains, runtime.device)
            # Seeded right before the student, W_f and the student's branch are built: reproducible runs.
            seed_everything(run_seed)
            student = MultiDomainBert.from_pretrained(pretrained_student, num_labels=len(task.labels), domains=None)

            def objective(stage: str, _teacher=teacher, _student=student) -> MetaDistillObjective:
                return MetaDistillObjective(_student, _teacher, stage=stage, num_domains=D,
                                            tkd_weight=opts.tkd_weight, temperature=opts.temperature,
                                            class_mean=opts.class_mean, mask_queries=opts.mask_queries)

            def make_batch(step):
                return make_meta_batch(task, "train", shard(step, runtime.rank, runtime.world), scores, runtime.device)

            def evaluate(module, _d=d):
                return {task.domains[_d]: domain_accuracy(module.student, task, "dev", _d, stage_b.eval_batch_size,
                                                          runtime, False)}

            base = {"method": METHOD, "teacher": TEACHER_KIND, "task": task.name, "domain": dname, "seed": run_seed,
                    "metakd": opts.model_dump(), "sizes": task.sizes("train"),
                    "max_seq_len": params.active.max_seq_len, "fewshot": fewshot,
                    "teacher_path": str(checkpoints[dname]), "pretrained": str(pretrained_student),
                    "world": runtime.world, "t": [round(float(scores[d].double().sum()), 6), len(scores[d])]}
            resume, live = paths.resume / dname, (paths.live / dname if paths.live else None)
            desc = f"student {task.name}/{METHOD}/{dname}"
            if two_stage:
                cfg_a = {**base, "stage": "intermediate", "settings": stage_a.model_dump()}
                _stage_a(objective("intermediate"), cfg_a, stage_a, make_batch, d, task, params, runtime,
                         resume / "stage-a", live / "stage-a" if live else None, run_seed, stop_at_step, desc)
                seed_everything(run_seed)  # stage B's dropout stream does not depend on how stage A ended
                final = objective("prediction")
                cfg_b = {**base, "stage": "prediction", "settings": stage_b.model_dump(), "after": fingerprint(cfg_a)}
                stage_dirs = (resume / "stage-b", live / "stage-b" if live else None)
            else:
                final = objective("joint")
                cfg_b = {**base, "stage": "joint", "settings": stage_b.model_dump()}
                stage_dirs = (resume, live)
            trainer = Trainer(
                module=final, make_batch=make_batch,
                schedule=Schedule(kind="single", sizes=tuple(task.sizes("train")), batch_size=stage_b.batch_size,
                                  seed=run_seed, domain=d),
                settings=stage_b, runtime=runtime, engine=params.engine, evaluate=evaluate, domains=[dname],
                resume_dir=stage_dirs[0], live_dir=stage_dirs[1], config=cfg_b, snapshot=lambda m: m.snapshot_state(),
                find_unused_parameters=False, stop_at_step=stop_at_step,
                desc=desc + (" (stage B)" if two_stage else ""),
            )
            result = trainer.fit()
            if runtime.is_main:
                selected[dname] = save_selected(
                    trainer=trainer, result=result, restore=final.load_snapshot, model=student, task=task,
                    domain=d, head=0, out_dir=tmp, tokenizer=tokenizer, batch_size=stage_b.eval_batch_size,
                    runtime=runtime, multi_head=False,
                    metadata={"role": "student", "method": METHOD, "teacher": TEACHER_KIND, "run": METHOD,
                              "task": task.name, "seed": seed, "fewshot": fewshot, "schedule": opts.schedule,
                              "metakd": opts.model_dump(), "settings": stage_b.model_dump(),
                              "stage_a": stage_a.model_dump() if two_stage else None,
                              "max_seq_len": params.active.max_seq_len},
                )
            trainer.finish()
            if two_stage and runtime.is_main:
                # The domain is complete: its stage-A student is no longer needed to resume.
                (resume / "stage-a" / STAGE_A_STUDENT).unlink(missing_ok=True)
            del final, teacher, student
        if not runtime.is_main:
            return {}
        metrics = _summarise(selected, task.domains)
        write_json(tmp / "student.json", {
            "method": METHOD, "teacher": TEACHER_KIND, "run": METHOD, "task": task.name, "seed": seed,
            "domains": task.domains, "labels": task.labels, "lr": stage_b.lr, "fewshot": fewshot,
            "schedule": opts.schedule, "stage_a": stage_a.model_dump() if two_stage else None,
            "stage_b": stage_b.model_dump(), "metrics": metrics,
        })
    write_json(paths.metrics, metrics)
    discard_resume(paths.resume, runtime)
    log.info("student %s/%s test accuracy: %s", task.name, METHOD,
             " ".join(f"{d}={metrics['test'][d]:.4f}" for d in task.domains) + f" avg={metrics['test']['average']:.4f}")
    return metrics


def _stage_a(objective: MetaDistillObjective, config: dict[str, Any], settings: TrainSettings, make_batch,
             domain: int, task: TaskSplits, params: Params, runtime: Runtime, resume: Path, live: Path | None,
             seed: int, stop_at_step: int | None, desc: str) -> None:
    """Stage A: the lambda-weighted intermediate-layer loss; the LAST student is kept (no dev selection).

    Its final student is saved in the resume folder, so a run killed during stage B does not
    repeat stage A; the file goes when the domain's run completes.
    """
    saved = resume / STAGE_A_STUDENT
    status = resume / "status.json"
    if saved.is_file() and status.is_file():
        done = read_json(status)
        if done.get("complete") and done.get("fingerprint") == fingerprint(config):
            objective.student.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
            log.info("%s: stage A already complete in %s; continuing with stage B", desc, resume)
            return
    trainer = Trainer(
        module=objective, make_batch=make_batch,
        schedule=Schedule(kind="single", sizes=tuple(task.sizes("train")), batch_size=settings.batch_size,
                          seed=seed, domain=domain),
        settings=settings, runtime=runtime, engine=params.engine,
        # No model selection in stage A: the prediction layer is untrained, so dev accuracy means nothing.
        evaluate=lambda module: {}, domains=[], resume_dir=resume, live_dir=live, config=config,
        find_unused_parameters=True,  # the student's classifier gets no gradient in stage A
        stop_at_step=stop_at_step, desc=desc + " (stage A)",
    )
    trainer.fit()
    trainer.finish()
    if runtime.is_main:
        state = {k: v.detach().cpu() for k, v in objective.student.state_dict().items()}
        with atomic_file(saved, "wb") as handle:
            torch.save(state, handle)
    runtime.barrier()
