"""What a bf16 teacher costs in accuracy and buys in speed (engine.teacher_precision).

Runs the distillation objective on the same rows twice, the frozen teacher's forward in fp32 and
in bf16 autocast (the student in fp32 both times, eval mode so dropout does not differ), and
reports, per loss term of eqs. 1-4 (embeddings, attention, hidden, prediction), the largest
relative change over every domain and batch, the relative change of the summed loss, the cosine
between the two gradients of the student's parameters, and the teacher forward's time in each
precision. The tolerance the engine's ``auto`` is held to is docs/speed.md's; tests/test_precision.py
checks it on a real checkpoint in CI.

    python benchmarks/bench_precision.py --teacher ../shared/models/all-MiniLM-L6-v2 \\
        --student ../shared/models/all-MiniLM-L6-v2 --student-layers 3 --data data/prepared/amazon

Without --data the rows are random token ids (lengths L/2..L). Prints a table and one JSON line.
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
from _common import device_name, encoder, now, random_rows, run_main, shape_of, sync  # noqa: E402

log = logging.getLogger("bench_precision")

TERMS = ("embd", "attn", "hidn", "pred")


def batches(args, vocab: int):
    """``args.batches`` DistillBatches of ``args.rows`` rows per domain."""
    from hrkd.distill.batches import make_distill_batch

    if args.data:
        from hrkd.data.loading import load_task
        from hrkd.models.pretrained import load_tokenizer

        task = load_task(args.data, load_tokenizer(args.tokenizer or args.teacher), args.max_seq_len, splits=("train",))
        D = len(task.domains)
        for i in range(args.batches):
            step = [(d, torch.arange(i * args.rows, (i + 1) * args.rows)) for d in range(D)]
            yield make_distill_batch(task, "train", step, list(range(D)))
        return
    from hrkd.data.loading import Batch
    from hrkd.distill.batches import concat_domain_batches

    g = torch.Generator().manual_seed(0)
    for _ in range(args.batches):
        parts = []
        for _d in range(args.domains):
            ids, mask = random_rows(args.rows, args.max_seq_len, vocab, g)
            parts.append(Batch(ids, mask, torch.zeros_like(ids), torch.zeros(args.rows, dtype=torch.long),
                               torch.zeros(args.rows, dtype=torch.long)))
        yield concat_domain_batches(parts)


def build(args, num_domains: int, teacher_autocast):
    from hrkd.config import Distill
    from hrkd.distill.objective import KDObjective
    from hrkd.distill.teacher_models import TeacherGroup
    from hrkd.models import MultiDomainBert

    names = [f"d{i}" for i in range(num_domains)]
    torch.manual_seed(0)
    t_enc = encoder(args.teacher, (12, 768, 12, 3072), 30522, args.max_seq_len, 1)
    teacher = MultiDomainBert(t_enc, num_labels=2, domains=names).eval().requires_grad_(False)
    group = TeacherGroup(teacher, tuple(range(num_domains)), torch.arange(num_domains))
    student = MultiDomainBert(encoder(args.student, (4, 312, 12, 1200), 30522, args.max_seq_len, 0, args.student_layers),
                              num_labels=2, domains=names)
    layers, hidden = shape_of(t_enc)[:2]
    return KDObjective(student, [group], num_domains=num_domains, method=args.method, distill=Distill(),
                       teacher_layers=layers, teacher_hidden=hidden, teacher_autocast=teacher_autocast).eval()


def compare(obj, db, bf16) -> dict:
    """Loss terms, summed loss and student gradient with the teacher in fp32 and in bf16."""
    out = {}
    for name, ctx in (("fp32", lambda: torch.autocast("cpu", enabled=False)), ("bf16", bf16)):
        obj.teacher_autocast = ctx
        obj.zero_grad(set_to_none=True)
        start = time.perf_counter()
        views = obj.teacher_outputs(db)
        teacher_s = time.perf_counter() - start
        s_out = obj.student_outputs(db)
        terms = obj.domain_losses(db, s_out, views)
        loss, _ = obj(db)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in obj.student.parameters() if p.grad is not None])
        out[name] = {"embd": terms.embd.detach(), "attn": terms.attn.detach(), "hidn": terms.hidn.detach(),
                     "pred": terms.pred.detach(), "loss": loss.item(), "grad": grad.double(), "teacher_s": teacher_s,
                     "dtype": str(views[0].scores(obj.layer_map[-1]).dtype).replace("torch.", "")}
    a, b = out["fp32"], out["bf16"]
    rel = {t: float(((b[t] - a[t]).abs() / a[t].abs().clamp_min(1e-12)).max()) for t in TERMS}
    return {"rel": rel, "loss_rel": abs(b["loss"] - a["loss"]) / abs(a["loss"]),
            "grad_cos": float(torch.nn.functional.cosine_similarity(a["grad"], b["grad"], dim=0)),
            "teacher_s": {"fp32": a["teacher_s"], "bf16": b["teacher_s"]}, "teacher_dtype": b["dtype"],
            "student_dtype": str(next(obj.student.parameters()).dtype).replace("torch.", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="teacher checkpoint (local folder or hub id); default: random BERT-base")
    parser.add_argument("--student", help="student checkpoint; default: random 4L-312D")
    parser.add_argument("--student-layers", type=int)
    parser.add_argument("--tokenizer", help="tokenizer for --data [the teacher's]")
    parser.add_argument("--data", help="prepared task folder (data/prepared/<task>); default: random token ids")
    parser.add_argument("--domains", type=int, default=4, help="domains of random rows (without --data)")
    parser.add_argument("--rows", type=int, default=8, help="rows per domain per batch")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--method", default="multi-domain-kd")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cpu")
    results = []
    obj = None
    for db in batches(args, 30522):
        if obj is None:
            obj = build(args, len(db.spans), None)
        results.append(compare(obj, db, lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
        sync(device)
    worst = {t: max(r["rel"][t] for r in results) for t in TERMS}
    summary = {
        "max_rel_change": {t: round(v, 6) for t, v in worst.items()},
        "max_loss_rel_change": round(max(r["loss_rel"] for r in results), 6),
        "min_grad_cosine": round(min(r["grad_cos"] for r in results), 6),
        # The first batch pays oneDNN's bf16 kernel set-up; the others are the steady state.
        "teacher_forward_s": {k: round(sorted(r["teacher_s"][k] for r in results[1:] or results)[0], 4)
                              for k in ("fp32", "bf16")},
        "teacher_scores_dtype": results[0]["teacher_dtype"], "student_param_dtype": results[0]["student_dtype"],
    }
    summary["teacher_speedup"] = round(summary["teacher_forward_s"]["fp32"] / summary["teacher_forward_s"]["bf16"], 2)
    for t in TERMS:
        log.info("%-5s max relative change %.2e", t, worst[t])
    log.info("summed loss %.2e, gradient cosine >= %.6f, teacher forward %.2fx faster in bf16",
             summary["max_loss_rel_change"], summary["min_grad_cosine"], summary["teacher_speedup"])
    print(json.dumps({"bench": "precision", "date": now(), "device": device_name(device), "torch": torch.__version__,
                      "threads": torch.get_num_threads(),
                      "config": {k: v for k, v in vars(args).items()}, "results": summary}))


if __name__ == "__main__":
    run_main(main)
