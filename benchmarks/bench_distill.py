"""Distillation throughput: examples/s and peak memory of multi-domain-kd vs hrkd training steps.

Paper dimensions (--dims paper): random-weight BERT-base teachers (12L/768/12 heads, one per
domain unless --shared-teacher), a 4L-312D/12-head/1200-FFN student, 5 domains, 32 examples per
domain per step, sequence length 128, random token ids; full training steps (forward, backward,
AdamW) under the engine's autocast (bf16 on GPU). --dims small is the `small` profile (MiniLM-L6
teacher, its first 3 layers as student, 4 domains x 8 rows, seq 48); --teacher/--student load real
checkpoints (a local folder or hub id) in place of random weights, --student-layers keeps the
student's first k layers. --dims tiny is a seconds-long CPU smoke check. --teacher-cache times
the steps of every epoch after the first, whose teacher outputs come from engine.teacher_cache_gib's
cache (the warm-up fills it).

    python benchmarks/bench_distill.py --dims paper --device cuda
    python benchmarks/bench_distill.py --dims small --teacher ../shared/models/all-MiniLM-L6-v2 \
        --student ../shared/models/all-MiniLM-L6-v2 --student-layers 3
    python benchmarks/bench_distill.py --dims tiny --steps 3 --warmup 1

Prints a table and one JSON line (device, config, date, results, HRKD overhead in % over
multi-domain-kd; the target is <= 10 %).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (count_flops, device_name, encoder, now, peak_memory, peaks, precision_name,  # noqa: E402
                     random_rows, reset_peak, run_main, shape_of, sync, throughput, time_steps)

log = logging.getLogger("bench_distill")

DIMS = {
    "paper": {"teacher": (12, 768, 12, 3072), "student": (4, 312, 12, 1200), "domains": 5, "per_domain": 32,
              "seq": 128, "vocab": 30522},
    "small": {"teacher": (6, 384, 12, 1536), "student": (3, 384, 12, 1536), "domains": 4, "per_domain": 8,
              "seq": 48, "vocab": 30522},
    "tiny": {"teacher": (4, 48, 4, 96), "student": (2, 32, 4, 64), "domains": 3, "per_domain": 4, "seq": 32,
             "vocab": 100},
}


def build(method: str, cfg: dict, args, device: torch.device):
    from hrkd.config import Distill
    from hrkd.distill.objective import KDObjective
    from hrkd.distill.teacher_models import TeacherGroup
    from hrkd.models import MultiDomainBert

    D = cfg["domains"]
    names = [f"d{i}" for i in range(D)]
    teachers = []
    if args.shared_teacher:
        model = MultiDomainBert(encoder(args.teacher, cfg["teacher"], cfg["vocab"], cfg["seq"], 1), num_labels=3,
                                domains=names)
        teachers.append(TeacherGroup(model.eval().requires_grad_(False).to(device), tuple(range(D)),
                                     torch.arange(D, device=device)))
    else:
        for d in range(D):
            model = MultiDomainBert(encoder(args.teacher, cfg["teacher"], cfg["vocab"], cfg["seq"], 1 + d), num_labels=3,
                                    domains=None)
            head_of = torch.full((D,), -1, dtype=torch.long)
            head_of[d] = 0
            teachers.append(TeacherGroup(model.eval().requires_grad_(False).to(device), (d,), head_of.to(device)))
    torch.manual_seed(0)
    student = MultiDomainBert(encoder(args.student, cfg["student"], cfg["vocab"], cfg["seq"], 0, args.student_layers),
                              num_labels=3, domains=names)
    t_layers, t_hidden = shape_of(teachers[0].model.encoder)[:2]
    obj = KDObjective(student, teachers, num_domains=D, method=method, distill=Distill(),
                      teacher_layers=t_layers, teacher_hidden=t_hidden, teacher_autocast=args.runtime.teacher_autocast)
    return obj.to(device).train()


def make_batch(cfg: dict, device: torch.device):
    from hrkd.data.loading import Batch
    from hrkd.distill.batches import DistillBatch

    D, b, L = cfg["domains"], cfg["per_domain"], cfg["seq"]
    ids, mask = random_rows(D * b, L, cfg["vocab"], torch.Generator().manual_seed(0))
    batch = Batch(ids, mask, torch.zeros_like(ids), torch.zeros(D * b, dtype=torch.long),
                  torch.arange(D).repeat_interleave(b))
    rows = tuple(torch.arange(b) for _ in range(D))  # each domain's rows 0..b-1, for the teacher cache
    return DistillBatch(batch=batch.to(device), spans=tuple((d * b, (d + 1) * b) for d in range(D)), rows=rows)


def bench(method: str, cfg: dict, args, runtime) -> dict:
    from hrkd.engine import make_optimizer

    device = runtime.device
    obj = build(method, cfg, args, device)
    db = make_batch(cfg, device)
    if args.teacher_cache:
        # Every measured step re-reads the rows the first warm-up step cached: an epoch after the first.
        if not obj.enable_teacher_cache([cfg["per_domain"]] * cfg["domains"], cfg["seq"], budget_gib=1e9):
            raise SystemExit("teacher cache could not be enabled")
    if args.compile:
        # Forwards only: the objective's Python (spans, losses, graph) stays eager, as it would in a run.
        obj.student = torch.compile(obj.student, dynamic=False)
        for group in obj.teachers:
            group.model.forward = torch.compile(group.model.forward, dynamic=False)
    opt = make_optimizer(obj, 0.01, 1e-4)
    last = {}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss, _ = obj(db)
        loss.backward()
        opt.step()
        last["loss"] = loss.detach()

    reset_peak(device)
    start = time.perf_counter()
    step()  # the first step pays for compilation (and oneDNN's kernel set-up)
    sync(device)
    first_s = time.perf_counter() - start
    step_s = time_steps(step, max(args.warmup - 1, 0), args.steps, device)
    peak, kind = peak_memory(device)
    flops = count_flops(step)  # after timing: its dispatch overhead must not be timed
    result = {**throughput(step_s, cfg["domains"] * cfg["per_domain"], db.batch.attention_mask, flops, args.peaks),
              "first_step_s": round(first_s, 2), "peak_mem_mib": round(peak, 1), "memory": kind,
              "final_loss": round(float(last["loss"]), 5)}
    return result


def main() -> None:
    from hrkd.config import Engine
    from hrkd.registry import KD_METHODS as METHODS
    from hrkd.engine import setup_runtime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", choices=sorted(DIMS), default="paper")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--teacher-precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="the frozen teachers' forwards (engine.teacher_precision)")
    parser.add_argument("--methods", default="multi-domain-kd,hrkd", help="comma-separated distillation methods")
    parser.add_argument("--shared-teacher", action="store_true", help="one teacher encoder for all domains (less memory)")
    parser.add_argument("--teacher", help="real teacher checkpoint (local folder or hub id) instead of random weights")
    parser.add_argument("--student", help="real student checkpoint (local folder or hub id) instead of random weights")
    parser.add_argument("--student-layers", type=int, help="keep the student checkpoint's first k layers")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student's and teachers' forwards")
    parser.add_argument("--teacher-cache", action="store_true",
                        help="time steps whose teacher outputs come from the cache (every epoch after the first)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS or m == "tinybert-kd"]
    if unknown:
        parser.error(f"unknown or single-domain method(s) {unknown}; choose from {[m for m in METHODS if m != 'tinybert-kd']}")
    runtime = setup_runtime(Engine(device=args.device, precision=args.precision,
                                   teacher_precision=args.teacher_precision, progress=False))
    args.runtime = runtime
    args.peaks = peaks(runtime.device)
    cfg = dict(DIMS[args.dims])
    results = {m: bench(m, cfg, args, runtime) for m in methods}
    cfg.update(teacher_source=args.teacher, student_source=args.student, student_layers=args.student_layers)

    log.info("%-18s %12s %10s %12s %10s %12s", "method", "examples/s", "step ms", "tokens/s", "GFLOP/s", "peak MiB")
    for m, r in results.items():
        log.info("%-18s %12.1f %10.2f %12.1f %10.1f %12.1f", m, r["examples_per_s"], r["step_ms"], r["tokens_per_s"],
                 r["gflops"], r["peak_mem_mib"])
    log.info("measured matmul peak (GFLOP/s): %s", args.peaks)
    overhead = None
    if "hrkd" in results and "multi-domain-kd" in results:
        overhead = round(100 * (results["hrkd"]["step_ms"] / results["multi-domain-kd"]["step_ms"] - 1), 2)
        log.info("HRKD overhead over multi-domain-kd: %+.1f %% of step time (target <= 10 %%)", overhead)
    print(json.dumps({
        "bench": "distill", "date": now(), "device": device_name(runtime.device), "torch": torch.__version__,
        "precision": precision_name(runtime.amp_dtype), "teacher_precision": precision_name(runtime.teacher_amp_dtype),
        "threads": torch.get_num_threads(), "matmul_peak_gflops": args.peaks,
        "config": {"dims": args.dims, **cfg, "steps": args.steps, "warmup": args.warmup,
                   "shared_teacher": args.shared_teacher, "teacher_cache": args.teacher_cache,
                   "compile": args.compile},
        "results": results, "hrkd_overhead_pct": overhead,
    }))


if __name__ == "__main__":
    run_main(main)
