"""DVC stage report: Tables 1-6, the significance test and Figure 2 under reports/ (docs/report.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from hrkd.cli import stage

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
@stage
def main(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="Parameters file."),
    root: Path = typer.Option(Path("."), help="Repository root holding metrics/, data/ and models/."),
    out: Path = typer.Option(Path("reports"), help="Output folder (relative to --root)."),
) -> None:
    from hrkd.config import load_params
    from hrkd.report.build import build_report

    build_report(load_params(params_file), root=root, out_dir=out)


if __name__ == "__main__":
    app()
