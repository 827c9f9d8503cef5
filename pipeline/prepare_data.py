"""DVC stage `prepare`: write data/prepared/<task> (per-domain train/dev/test parquet files)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hrkd.cli import stage
from hrkd.config import PARAMS_FILE, load_params

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
@stage
def main(
    task: str = typer.Option(..., help="Task name from params.yaml `tasks` (mnli, amazon, custom...)"),
    params: Path = typer.Option(Path(PARAMS_FILE), help="Parameter file"),
    out: Optional[Path] = typer.Option(None, help="Output folder [default: data/prepared/<task>]"),
) -> None:
    from hrkd.data.prepare import prepare_task  # after logging is set up by @stage

    settings = load_params(params)
    prepare_task(settings, task, out or Path("data") / "prepared" / task)


if __name__ == "__main__":
    app()
