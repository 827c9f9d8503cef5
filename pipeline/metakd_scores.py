"""DVC stage metakd_scores: Meta-KD transferability scores t_i of every training row of one task.

Computed once from the frozen pre-trained teacher encoder (not a fine-tuned teacher) and cached
as data/metakd/<task>/{scores.parquet, summary.json}; the meta-teacher and the Meta-KD students
read them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from hrkd.cli import stage

app = typer.Typer(add_completion=False, help=__doc__)
log = logging.getLogger("hrkd.pipeline.metakd_scores")


@app.command()
@stage
def main(
    task: str = typer.Option(..., help="Task name from params.yaml `tasks` (mnli, amazon, ...)."),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="Parameters file."),
    data: Optional[Path] = typer.Option(None, help="Prepared task folder [data/prepared/<task>]."),
    pretrained: Path = typer.Option(Path("models/pretrained/teacher"), help="Pre-trained teacher encoder + tokenizer."),
    out: Optional[Path] = typer.Option(None, help="Output folder [data/metakd/<task>]."),
) -> None:
    import torch

    from hrkd.config import load_params
    from hrkd.data.loading import load_task
    from hrkd.engine import setup_runtime
    from hrkd.metakd.scores import compute_scores, summary_line
    from hrkd.models import load_encoder, load_tokenizer

    params = load_params(params_file)
    params.task(task)
    data_dir = data or Path("data/prepared") / task
    tokenizer = load_tokenizer(pretrained, setting="--pretrained")
    # One process is plenty for an inference pass: this stage is never relaunched under torchrun.
    runtime = setup_runtime(params.engine)
    task_data = load_task(data_dir, tokenizer, params.active.max_seq_len, splits=["train"],
                          cache=params.engine.token_cache)
    with torch.random.fork_rng(devices=[]):
        encoder = load_encoder(pretrained, setting="--pretrained").to(runtime.device).eval()
    summary = compute_scores(task=task_data, data_dir=data_dir, encoder=encoder, settings=params.metakd.scores,
                             device=runtime.device, out_dir=out or Path("data/metakd") / task,
                             provenance={"encoder": str(pretrained), "max_seq_len": params.active.max_seq_len})
    log.info("%s: %s", task, summary_line(summary))


if __name__ == "__main__":
    app()
