"""Teacher-training throughput: examples/s and peak memory of full fine-tuning steps.

Paper dimensions (--dims paper): a random-weight BERT-base (12L/768/12 heads/3072 FFN),
sequence length 128 (rows of random length between 64 and 128, padded to the longest), batch
32 — for the ``hrkd`` kind one batch of 32 from each of 5 domains per step, as the HRKD-teacher
trains. Each step is forward + backward + clip + AdamW under the
engine's autocast (bf16 on GPUs that support it). --dims small is the `small` profile (MiniLM-L6,
batch 8, seq 48, 4 domains); --model loads a real checkpoint (local folder or hub id) in place of
random weights. --dims tiny is a seconds-long CPU smoke check.

    python benchmarks/bench_teacher.py --dims paper --device cuda
    python benchmarks/bench_teacher.py --dims small --model ../shared/models/all-MiniLM-L6-v2
    python benchmarks/bench_teacher.py --dims tiny --steps 3 --warmup 1

Prints a table and one JSON line: device, precision, threads, the matmul peaks measured in the
same process, config, date, and per kind examples/s, tokens/s (real and padded), GFLOP per step
(torch's FLOP counter), GFLOP/s and its fraction of each peak, peak memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (count_flops, device_name, encoder, now, peak_memory, peaks, precision_name,  # noqa: E402
                     random_rows, reset_peak, run_main, throughput, time_steps)

log = logging.getLogger("bench_teacher")

DIMS = {
    "paper": {"model": (12, 768, 12, 3072), "domains": 5, "batch": 32, "seq": 128, "vocab": 30522, "labels": 3},
    "small": {"model": (6, 384, 12, 1536), "domains": 4, "batch": 8, "seq": 48, "vocab": 30522, "labels": 2},
    "tiny": {"model": (2, 32, 4, 64), "domains": 3, "batch": 4, "seq": 32, "vocab": 100, "labels": 3},
}


def bench(kind: str, cfg: dict, args, runtime, peak_gflops: dict[str, float]) -> dict:
    from hrkd.data.loading import Batch
    from hrkd.engine import make_optimizer
    from hrkd.models import MultiDomainBert
    from hrkd.registry import TEACHERS
    from hrkd.teachers import ClassifierObjective

    device = runtime.device
    D = cfg["domains"]
    multi = TEACHERS[kind].multi_head
    model = MultiDomainBert(encoder(args.model, cfg["model"], cfg["vocab"], cfg["seq"], 0), num_labels=cfg["labels"],
                            domains=[f"d{i}" for i in range(D)] if multi else None)
    objective = ClassifierObjective(model, D, multi_head=multi, sum_domains=TEACHERS[kind].sum_domains).to(device).train()
    rows = cfg["batch"] * (D if TEACHERS[kind].schedule == "parallel" else 1)  # one batch of every domain
    g = torch.Generator().manual_seed(0)
    ids, mask = random_rows(rows, cfg["seq"], cfg["vocab"], g)
    batch = Batch(ids, mask, torch.zeros_like(ids), torch.randint(0, cfg["labels"], (rows,), generator=g),
                  torch.arange(rows) % D).to(device)
    opt = make_optimizer(objective, 0.01, 5e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss, _ = objective(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
        opt.step()

    reset_peak(device)
    step_s = time_steps(step, args.warmup, args.steps, device)
    peak, what = peak_memory(device)
    flops = count_flops(step)  # after timing: the counter's dispatch overhead must not be timed
    return {**throughput(step_s, rows, batch.attention_mask, flops, peak_gflops), "rows_per_step": rows,
            "peak_mem_mib": round(peak, 1), "memory": what}


def main() -> None:
    from hrkd.config import Engine
    from hrkd.engine import setup_runtime
    from hrkd.registry import TRAINED_TEACHERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", choices=sorted(DIMS), default="paper")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--kinds", default="mix,hrkd", help=f"comma-separated teacher kinds from {list(TRAINED_TEACHERS)}")
    parser.add_argument("--model", help="real checkpoint (local folder or hub id) instead of random weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TRAINED_TEACHERS]
    if unknown:
        parser.error(f"unknown teacher kind(s) {unknown}; choose from {list(TRAINED_TEACHERS)}")
    runtime = setup_runtime(Engine(device=args.device, precision=args.precision, progress=False))
    peak_gflops = peaks(runtime.device)
    cfg = DIMS[args.dims]
    results = {}
    for k in kinds:
        results[k] = bench(k, cfg, args, runtime, peak_gflops)
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()  # the last kind's model is gone; its cached blocks would inflate the next peak
    log.info("%-8s %12s %10s %12s %10s %8s %12s", "kind", "examples/s", "step ms", "tokens/s", "GFLOP/s", "rows",
             "peak MiB")
    for k, r in results.items():
        log.info("%-8s %12.1f %10.2f %12.1f %10.1f %8d %12.1f", k, r["examples_per_s"], r["step_ms"], r["tokens_per_s"],
                 r["gflops"], r["rows_per_step"], r["peak_mem_mib"])
    log.info("measured matmul peak (GFLOP/s): %s", peak_gflops)
    print(json.dumps({
        "bench": "teacher", "date": now(), "device": device_name(runtime.device), "torch": torch.__version__,
        "precision": precision_name(runtime.amp_dtype), "threads": torch.get_num_threads(),
        "matmul_peak_gflops": peak_gflops,
        "config": {"dims": args.dims, **cfg, "model_source": args.model, "steps": args.steps, "warmup": args.warmup},
        "results": results,
    }))


if __name__ == "__main__":
    run_main(main)
