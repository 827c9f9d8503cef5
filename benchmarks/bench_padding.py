"""Padding of the training schedules: real vs padded tokens per epoch, with and without length grouping.

``collate`` pads every step to its longest row (in ``parallel``, the longest of all domains'
batches), so a step costs width x rows tokens whatever the rows' lengths. This counts, for a
prepared task's train split tokenised at --max-seq-len, the real tokens of an epoch (cycled rows
counted each time they come), the padded tokens (sum over steps of width x rows) and the padding
fraction, for Schedule.group_by_length off (0) and at a few megabatch sizes. Attention costs
width^2 per row, so ``attention_ratio`` (sum of width^2 x rows, grouped / ungrouped) is given too.
No model runs: the numbers are exact for the schedule, not timings.

    python benchmarks/bench_padding.py --data data/prepared/amazon --tokenizer ../shared/models/all-MiniLM-L6-v2
    python benchmarks/bench_padding.py --data data/prepared/amazon --tokenizer bert-base-uncased \\
        --max-seq-len 256 --batch-size 8 --kind parallel --groups 0,10,50

``--kind single`` adds up one schedule per domain (the single teacher trains one model per domain).
Prints a table and one JSON line with date, config and results.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import now, run_main  # noqa: E402

log = logging.getLogger("bench_padding")

KINDS = ("single", "mix", "mtl", "parallel")


def count(schedules, lengths: tuple[torch.Tensor, ...], epochs: int) -> dict:
    """Real, padded and width^2-weighted tokens per epoch (averaged over ``epochs``) of ``schedules``."""
    real = padded = attention = steps = 0
    for sched in schedules:
        for epoch in range(epochs):
            for step in sched.epoch(epoch):
                step_lengths = torch.cat([lengths[d][idx] for d, idx in step]).long()
                width = max(int(step_lengths.max()), 1)  # as collate trims
                real += int(step_lengths.sum())
                padded += width * len(step_lengths)
                attention += width * width * len(step_lengths)
                steps += 1
    return {"steps_per_epoch": steps // epochs, "real_tokens": real // epochs, "padded_tokens": padded // epochs,
            "padding_fraction": round(1 - real / padded, 4), "attention_units": attention // epochs}


def main() -> None:
    from hrkd.data.loading import Schedule, load_task
    from hrkd.data.format import read_meta
    from hrkd.models.pretrained import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared task folder (meta.json + <domain>/<split>.parquet)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer source: local folder or hub id")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kind", choices=KINDS, default="parallel")
    parser.add_argument("--groups", default="0,10,50", help="comma-separated group_by_length values (0 = off)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="epochs averaged over (each epoch is reshuffled)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        groups = [int(g) for g in args.groups.split(",") if g.strip()]
    except ValueError:
        parser.error(f"--groups takes comma-separated integers, got {args.groups!r}")
    if not groups or min(groups) < 0 or args.epochs < 1 or args.batch_size < 1:
        parser.error("--groups needs values >= 0, --epochs and --batch-size values >= 1")
    if 0 not in groups:
        groups.insert(0, 0)  # the baseline every ratio is relative to

    tokenizer = load_tokenizer(args.tokenizer, setting="--tokenizer")
    task = load_task(args.data, tokenizer, args.max_seq_len, splits=("train",))
    sizes, lengths = tuple(task.sizes("train")), task.lengths("train")
    every = torch.cat(lengths).float()
    data = {"task": task.name, "domains": task.domains, "train_rows": list(sizes),
            "mean_length": round(float(every.mean()), 1), "median_length": float(every.median()),
            "truncated_fraction": round(float((every >= args.max_seq_len).float().mean()), 4)}
    log.info("%s: %s train rows, mean length %.1f, median %.0f, %.1f %% cut at %d", task.name, list(sizes),
             data["mean_length"], data["median_length"], 100 * data["truncated_fraction"], args.max_seq_len)

    results = {}
    for g in groups:
        domains = range(len(sizes)) if args.kind == "single" else [0]
        schedules = [Schedule(args.kind, sizes, args.batch_size, seed=args.seed, domain=d, lengths=lengths,
                              group_by_length=g) for d in domains]
        results[str(g)] = count(schedules, lengths, args.epochs)
    base = results["0"]
    for r in results.values():
        r["padded_ratio"] = round(r["padded_tokens"] / base["padded_tokens"], 4)
        r["attention_ratio"] = round(r["attention_units"] / base["attention_units"], 4)

    log.info("%-6s %7s %12s %14s %9s %13s %15s", "group", "steps", "real tok", "padded tok", "padding",
             "padded ratio", "attention ratio")
    for g, r in results.items():
        log.info("%-6s %7d %12d %14d %8.1f%% %13.3f %15.3f", g, r["steps_per_epoch"], r["real_tokens"],
                 r["padded_tokens"], 100 * r["padding_fraction"], r["padded_ratio"], r["attention_ratio"])
    print(json.dumps({
        "bench": "padding", "date": now(), "torch": torch.__version__,
        "config": {"data": str(args.data), "source": read_meta(args.data).source, "tokenizer": str(args.tokenizer),
                   "max_seq_len": args.max_seq_len, "batch_size": args.batch_size, "kind": args.kind,
                   "seed": args.seed, "epochs": args.epochs, "groups": groups, **data},
        "results": results,
    }))


if __name__ == "__main__":
    run_main(main)
