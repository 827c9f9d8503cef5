"""DVC stage `fewshot`: write data/fewshot/<task>/<rate>/ from the front of each train split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hrkd.cli import stage
from hrkd.config import PARAMS_FILE, load_params
from hrkd.errors import HRKDError

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
@stage
def main(
    task: str = typer.Option(..., help="Task name from params.yaml `fewshot.tasks`"),
    params: Path = typer.Option(Path(PARAMS_FILE), help="Parameter file"),
    prepared: Optional[Path] = typer.Option(None, help="Prepared task folder [default: data/prepared/<task>]"),
    out: Optional[Path] = typer.Option(None, help="Output folder [default: data/fewshot/<task>]"),
) -> None:
    from hrkd.data.fewshot import make_fewshot

    settings = load_params(params)
    settings.task(task)  # unknown task -> one-line error naming the known ones
    if task not in settings.tasks:
        raise HRKDError(f"task '{task}' is not in params.yaml tasks {settings.tasks}; add it there first")
    make_fewshot(
        prepared or Path("data") / "prepared" / task,
        out or Path("data") / "fewshot" / task,
        settings.fewshot.rates,
    )


if __name__ == "__main__":
    app()
