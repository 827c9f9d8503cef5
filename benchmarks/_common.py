"""Helpers shared by the benchmark scripts: random-weight BERTs, step timing, FLOPs against the
measured matmul peak, memory, device description."""

from __future__ import annotations

import datetime as dt
import platform
import resource
import time
from pathlib import Path
from typing import Callable

import torch


def run_main(main: Callable[[], None]) -> None:
    """Run a bench's ``main``; a bad input (HRKDError: missing data, unknown domain) exits with its one line."""
    from hrkd.errors import HRKDError

    try:
        main()
    except HRKDError as err:
        raise SystemExit(f"error: {err}") from None


def bert(shape: tuple[int, int, int, int], vocab: int, seq: int, seed: int):
    """A random-weight BertModel of (layers, hidden, heads, ffn): throughput does not depend on weights."""
    from transformers import BertConfig, BertModel

    layers, hidden, heads, ffn = shape
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=max(512, seq)))


def encoder(source: str | None, shape: tuple[int, int, int, int], vocab: int, seq: int, seed: int,
            layers: int | None = None):
    """A real checkpoint's encoder (``source``: local folder or hub id; its first ``layers`` kept),
    or, without a source, a random-weight BERT of ``shape``."""
    if source is None:
        return bert(shape, vocab, seq, seed)
    from hrkd.models.pretrained import load_encoder_checked

    model, _ = load_encoder_checked(source, layers=layers, seed=seed)
    return model


def random_rows(rows: int, seq: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and an attention mask of rows between seq/2 and seq long, the first one
    full, so the step's width is ``seq`` as after collate; padded ids are 0."""
    ids = torch.randint(5, vocab, (rows, seq), generator=generator)
    lengths = torch.randint(seq // 2, seq + 1, (rows,), generator=generator)
    lengths[0] = seq
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def shape_of(model) -> tuple[int, int, int, int]:
    cfg = model.config
    return (int(cfg.num_hidden_layers), int(cfg.hidden_size), int(cfg.num_attention_heads), int(cfg.intermediate_size))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB and what it measures (allocator peak on GPU, process high-water mark on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with its bf16 units (what decides teacher_precision: auto)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from hrkd.engine import cpu_bf16_units

    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    except OSError:
        pass
    return f"{model} ({'+'.join(cpu_bf16_units()) or 'no bf16 units'}), {torch.get_num_threads()} threads"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def precision_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "fp32"


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """The best GFLOP/s of an n x n matmul in ``dtype`` here and now: the ceiling a step is read
    against (measured in the same process, so the same threads and clocks)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def count_flops(step: Callable[[], None]) -> int:
    """Matmul/attention FLOPs of one call (forward and backward) by torch's own counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds of ``steps`` calls after ``warmup`` (the median ignores a stray slow step)."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def throughput(step_s: float, rows: int, mask: torch.Tensor, flops: int, peaks: dict[str, float]) -> dict:
    """examples/s, real and padded tokens/s, GFLOP/s and its fraction of each measured matmul peak."""
    gflops = flops / step_s / 1e9
    return {"examples_per_s": round(rows / step_s, 2), "step_ms": round(1000 * step_s, 2),
            "tokens_per_s": round(float(mask.sum()) / step_s, 1), "padded_tokens_per_s": round(mask.numel() / step_s, 1),
            "gflop_per_step": round(flops / 1e9, 2), "gflops": round(gflops, 1),
            "peak_fraction": {k: round(gflops / v, 3) for k, v in peaks.items()}}


def peaks(device: torch.device) -> dict[str, float]:
    """Measured matmul peaks in GFLOP/s of fp32 and bf16 (and fp16 on GPU)."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    return {k: round(matmul_peak_gflops(device, v), 1) for k, v in dtypes.items()}
