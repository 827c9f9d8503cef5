"""Figure 2 (few-shot improvement rate) and the case-study heatmap, as PNGs.

matplotlib is imported inside the functions (Agg backend, no display) and the PNG metadata is
emptied, so the same numbers give byte-identical files and DVC sees no change on a rerun.
Every title names the profile and the data source: a demo figure must never pass for the paper's.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from hrkd.io import atomic_file
from hrkd.report.case_study import CaseStudy
from hrkd.report.tables import FewShotPoint

RUN_LABELS = {"hrkd": "HRKD-teacher →(HRKD) BERT_S", "metakd": "Meta-teacher →(Meta-distillation) BERT_S"}
RUN_COLORS = {"hrkd": "#1f77b4", "metakd": "#ff7f0e"}
BASE_LABEL = "BERT_B-single →(TinyBERT-KD) BERT_S"  # the run FEWSHOT_BASE names


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "hrkd", "font.size": 9})
    return plt


def _save(fig, path: Path) -> None:
    # Software/creation-time metadata would make the bytes depend on the matplotlib version or clock.
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, metadata={"Software": None})


def _title(text: str, provenance: str, width: int = 90) -> str:
    return text + "\n" + "\n".join(textwrap.wrap(provenance, width))


def figure2(points: list[FewShotPoint], provenance: str, path: str | Path) -> Path:
    """Grouped bars: improvement rate (%) of HRKD (and Meta-KD where it ran) at each sample rate."""
    plt = _pyplot()
    path = Path(path)
    tasks = sorted({p.task for p in points})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        pts = sorted((p for p in points if p.task == task), key=lambda p: p.rate)
        runs = [r for r in ("hrkd", "metakd") if any(r in p.rates for p in pts)]
        width = 0.8 / max(len(runs), 1)
        xs = list(range(len(pts)))
        for j, run in enumerate(runs):
            offs = [x - 0.4 + width * (j + 0.5) for x in xs]
            vals = [p.rates.get(run, float("nan")) for p in pts]
            bars = ax.bar(offs, vals, width, label=f"ours: {RUN_LABELS[run]}", color=RUN_COLORS[run])
            ax.bar_label(bars, labels=[f"{v:.1f}" if v == v else "" for v in vals], fontsize=8, padding=2)
            for x, p in zip(offs, pts):
                if run in p.paper:
                    ax.plot([x], [p.paper[run]], marker="*", markersize=12, color="black", linestyle="none",
                            label=f"paper: {run.upper() if run == 'hrkd' else 'Meta-KD'} (section 3.5 text)")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(xs, [f"{100 * p.rate:g}%\n({p.train_rows} rows)" for p in pts])
        ax.set_xlabel(f"sample rate of the {task} training data (training rows, all domains)")
        ax.set_ylabel(f"improvement rate (%) over\n{BASE_LABEL}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
        ax.set_title(_title(f"Figure 2: few-shot improvement rate, {task}", provenance, 80), fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def ratio_heatmap(study: CaseStudy, provenance: str, path: str | Path) -> Path:
    """r [layer x domain] per case: eval mode (top row) and with graph dropout (bottom row), centred at 1/D."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    path = Path(path)
    d = len(study.domains)
    cases = len(study.ratios)
    span = max(0.02, study.max_dev_eval, study.max_dev_dropout)
    norm = TwoSlopeNorm(vcenter=1.0 / d, vmin=1.0 / d - span, vmax=1.0 / d + span)
    fig, axes = plt.subplots(2, cases, figsize=(1.6 + 1.0 * d * cases, 2.6 + 0.9 * len(study.ratios[0]) * 2),
                             squeeze=False, layout="constrained")
    image = None
    for col in range(cases):
        for row, (values, mode) in enumerate(((study.ratios[col], "eval mode"), (study.ratios_dropout[col], "graph dropout on"))):
            ax = axes[row][col]
            image = ax.imshow(values, cmap="RdBu_r", norm=norm, aspect="auto")
            for m, layer in enumerate(values):
                for j, v in enumerate(layer):
                    ax.text(j, m, f"{v:.3f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(d), study.domains, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(values)), [f"m={m}" for m in range(len(values))], fontsize=8)
            ax.set_title(f"case {col + 1}, {mode}", fontsize=9)
            if col == 0:
                ax.set_ylabel("student layer (0 = embeddings)")
            if row == 1:
                ax.set_xlabel("domain")
    fig.colorbar(image, ax=axes.ravel().tolist(), label=f"domain-relational ratio r (centre 1/D = {1 / d:.3f})")
    fig.suptitle(_title(f"Case study (Tables 5-6): ratios of the HRKD student, {study.task} seed {study.seed}",
                        provenance, 30 + 25 * cases), fontsize=9)
    _save(fig, path)
    plt.close(fig)
    return path
