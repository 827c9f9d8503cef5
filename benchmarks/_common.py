"""Helpers shared by the benchmark scripts (random-weight BERTs, memory, device description)."""

from __future__ import annotations

import datetime as dt
import platform
import resource

import torch


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
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
