"""Stage `pretrained`: teacher/student encoders and tokenizer under models/pretrained (offline afterwards)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from hrkd.cli import stage

log = logging.getLogger("hrkd.pipeline.pretrained")


@stage
def main(
    params: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read"),
    data: Path = typer.Option(Path("data/prepared"), "--data", help="prepared data (demo vocabulary source)"),
    out: Path = typer.Option(Path("models/pretrained"), "--out", help="output directory"),
) -> None:
    # Heavy imports inside the command, so --help answers instantly.
    from transformers.utils import logging as hf_logging

    from hrkd.config import load_params
    from hrkd.models.pretrained import build_pretrained

    hf_logging.disable_progress_bar()  # per-shard progress bars only clutter `dvc repro` logs
    manifest = build_pretrained(load_params(params), data, out)
    log.info("wrote %s (profile %s)", out, manifest["profile"])


if __name__ == "__main__":
    typer.run(main)
