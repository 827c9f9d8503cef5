"""DVC stages distill_tinybert / distill: distil one student (method x teacher kind x seed) on one task."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hrkd.cli import stage

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
@stage
def main(
    task: str = typer.Option(..., help="Task name from params.yaml `tasks` (mnli, amazon, ...)."),
    method: str = typer.Option(..., help="tinybert-kd, multi-domain-kd, no-domain-rel, hrkd, no-self-attention, "
                                         "no-comp-agg or no-hierarchical."),
    teacher: str = typer.Option("hrkd", help="Teacher kind to distil from: single, mix, mtl or hrkd."),
    seed: int = typer.Option(1, help="Run seed (plus distill.seed_offset)."),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="Parameters file."),
    data: Optional[Path] = typer.Option(None, help="Prepared task folder [data/prepared/<task>]."),
    teachers: Optional[Path] = typer.Option(None, help="Teacher folder of the task [models/teachers/<task>]."),
    pretrained: Path = typer.Option(Path("models/pretrained/student"), help="Student encoder + tokenizer."),
    out: Optional[Path] = typer.Option(None, help="Output folder [models/students/<task>/<run>/<seed>]."),
    metrics: Optional[Path] = typer.Option(None, help="Metrics JSON [metrics/students/<task>/<run>-<seed>.json]."),
    live: Optional[Path] = typer.Option(None, help="DVCLive folder [runs/live/students/<task>-<run>-<seed>]."),
    resume: Optional[Path] = typer.Option(None, help="Resume folder [runs/resume/students/<task>-<run>-<seed>]."),
    fewshot: bool = typer.Option(False, "--fewshot", help="Few-shot run: use the few-shot student learning rate."),
) -> None:
    from hrkd.config import load_params
    from hrkd.distill import distill_student, run_name
    from hrkd.engine import maybe_relaunch, setup_runtime
    from hrkd.teachers import RunPaths

    params = load_params(params_file)
    params.task(task)
    name = run_name(method, teacher)  # unknown method / teacher kind -> one-line error
    maybe_relaunch(params.engine.nproc)
    tag = f"{task}-{name}-{seed}"
    paths = RunPaths(
        out=out or Path("models/students") / task / name / str(seed),
        metrics=metrics or Path("metrics/students") / task / f"{name}-{seed}.json",
        live=live or Path("runs/live/students") / tag,
        resume=resume or Path("runs/resume/students") / tag,
    )
    from hrkd.data.loading import load_task
    from hrkd.models import load_tokenizer

    tokenizer = load_tokenizer(pretrained, setting="--pretrained")
    runtime = setup_runtime(params.engine)
    task_data = load_task(data or Path("data/prepared") / task, tokenizer, params.active.max_seq_len)
    distill_student(method=method, teacher_kind=teacher, task=task_data, params=params, seed=seed,
                    teacher_dir=(teachers or Path("models/teachers") / task) / teacher, pretrained_student=pretrained,
                    tokenizer=tokenizer, runtime=runtime, paths=paths, fewshot=fewshot)


if __name__ == "__main__":
    app()
