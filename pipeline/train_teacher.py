"""DVC stages train_teacher / train_meta_teacher: fine-tune one teacher kind (single | mix | mtl | hrkd | meta) on one task."""

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
    kind: str = typer.Option(..., help="Teacher kind: single, mix, mtl, hrkd or meta (the Meta-KD meta-teacher)."),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="Parameters file."),
    data: Optional[Path] = typer.Option(None, help="Prepared task folder [data/prepared/<task>]."),
    pretrained: Path = typer.Option(Path("models/pretrained/teacher"), help="Teacher encoder + tokenizer."),
    out: Optional[Path] = typer.Option(None, help="Output folder [models/teachers/<task>/<kind>]."),
    metrics: Optional[Path] = typer.Option(None, help="Metrics JSON [metrics/teachers/<task>-<kind>.json]."),
    live: Optional[Path] = typer.Option(None, help="DVCLive folder [runs/live/teachers/<task>-<kind>]."),
    resume: Optional[Path] = typer.Option(None, help="Resume folder [runs/resume/teachers/<task>-<kind>]."),
    scores: Optional[Path] = typer.Option(None, help="Meta-KD transferability scores, kind meta only "
                                                     "[data/metakd/<task>]."),
) -> None:
    from hrkd.config import load_params
    from hrkd.driver import RunPaths
    from hrkd.engine import maybe_relaunch, setup_runtime
    from hrkd.registry import teacher_kind

    params = load_params(params_file)
    params.task(task)
    meta = teacher_kind(kind).metakd  # unknown kind -> one-line error
    maybe_relaunch(params.engine)
    tag = f"{task}-{kind}"
    paths = RunPaths(
        out=out or Path("models/teachers") / task / kind,
        metrics=metrics or Path("metrics/teachers") / f"{tag}.json",
        live=live or Path("runs/live/teachers") / tag,
        resume=resume or Path("runs/resume/teachers") / tag,
    )
    from hrkd.data.loading import load_task
    from hrkd.models import load_tokenizer

    tokenizer = load_tokenizer(pretrained)
    runtime = setup_runtime(params.engine)
    data_dir = data or Path("data/prepared") / task
    task_data = load_task(data_dir, tokenizer, params.active.max_seq_len, cache=params.engine.token_cache)
    common = dict(task=task_data, params=params, pretrained=pretrained, tokenizer=tokenizer, runtime=runtime,
                  paths=paths)
    if meta:
        from hrkd.metakd.scores import load_scores
        from hrkd.metakd.teacher import train_meta_teacher

        row_scores = (load_scores(scores or Path("data/metakd") / task, data_dir, task_data)
                      if params.metakd.teacher.sample_weights else None)
        train_meta_teacher(scores=row_scores, **common)
    else:
        from hrkd.teachers import train_teacher

        train_teacher(kind=kind, **common)


if __name__ == "__main__":
    app()
