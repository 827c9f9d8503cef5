"""DVC stages distill_tinybert / distill / distill_metakd: distil one student (method x teacher kind x seed) on one task."""

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
                                         "no-comp-agg, no-hierarchical, or metakd (with --teacher meta)."),
    teacher: str = typer.Option("hrkd", help="Teacher kind to distil from: single, mix, mtl, hrkd, or meta (metakd)."),
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
    scores: Optional[Path] = typer.Option(None, help="Meta-KD transferability scores, metakd only [data/metakd/<task>]."),
) -> None:
    from hrkd.config import load_params
    from hrkd.driver import RunPaths
    from hrkd.engine import maybe_relaunch, setup_runtime
    from hrkd.registry import method as method_spec
    from hrkd.registry import run_name

    params = load_params(params_file)
    params.task(task)
    name = run_name(method, teacher)  # unknown method / teacher kind -> one-line error
    metakd = method_spec(method).metakd
    maybe_relaunch(params.engine)
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
    data_dir = data or Path("data/prepared") / task
    task_data = load_task(data_dir, tokenizer, params.active.max_seq_len, cache=params.engine.token_cache)
    common = dict(task=task_data, params=params, seed=seed, teacher_dir=(teachers or Path("models/teachers") / task) / teacher,
                  pretrained_student=pretrained, tokenizer=tokenizer, runtime=runtime, paths=paths, fewshot=fewshot)
    if metakd:
        from hrkd.metakd.distill import distill_metakd
        from hrkd.metakd.scores import load_scores

        distill_metakd(scores=load_scores(scores or Path("data/metakd") / task, data_dir, task_data), **common)
    else:
        from hrkd.distill.runs import distill_student

        distill_student(method=method, teacher_kind=teacher, **common)


if __name__ == "__main__":
    app()
