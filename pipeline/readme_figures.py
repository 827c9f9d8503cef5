"""Splice the report's tables and figures into README.md (run after `dvc repro`; not a DVC stage).

README.md and docs/figures/ are git-tracked documentation, not pipeline outputs: this script
copies reports/figures/*.png to docs/figures/ and replaces the block between the
<!-- demo-figures --> markers with the tables of reports/tables/, so the README's numbers are
always generated, never typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hrkd.cli import stage

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
@stage
def main(
    readme: Path = typer.Option(Path("README.md"), help="README to update in place."),
    reports: Path = typer.Option(Path("reports"), help="Output folder of the report stage."),
    figures: Optional[Path] = typer.Option(None, help="Where the README's PNG copies go (git-tracked) "
                                           "[default: docs/figures, docs/figures/<block> for other blocks]."),
    block: str = typer.Option("demo", help="Which marker pair to fill: <!-- BLOCK-figures --> (demo, small)."),
) -> None:
    from hrkd.report.readme import update_readme

    if figures is None:
        figures = Path("docs/figures") if block == "demo" else Path("docs/figures") / block
    update_readme(readme, reports, figures, block)


if __name__ == "__main__":
    app()
