"""Splice the report's tables and figures into README.md (run after `dvc repro`; not a DVC stage).

README.md and docs/figures/ are git-tracked documentation, not pipeline outputs: this script
copies reports/figures/*.png to docs/figures/ and replaces the block between the
<!-- demo-figures --> markers with the tables of reports/tables/, so the README's numbers are
always generated, never typed.
"""

from __future__ import annotations

from pathlib import Path

import typer

from hrkd.cli import stage

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
@stage
def main(
    readme: Path = typer.Option(Path("README.md"), help="README to update in place."),
    reports: Path = typer.Option(Path("reports"), help="Output folder of the report stage."),
    figures: Path = typer.Option(Path("docs/figures"), help="Where the README's PNG copies go (git-tracked)."),
) -> None:
    from hrkd.report.readme import update_readme

    update_readme(readme, reports, figures)


if __name__ == "__main__":
    app()
