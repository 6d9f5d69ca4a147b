"""What both sides of `vs_llamacpp.py` share: the prompts, the timing rule and the bytes-per-token model."""

from __future__ import annotations

import time
from typing import Callable

import torch

Timings = dict[str, float]  # row name ("pp64", "tg32", …) → tokens/s

# Ordinary tokens only (the harmony special tokens start at 199998): random weights make any
# prompt as good as any other, and both engines get exactly the same ids.
ORDINARY_TOKENS = 199_998


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ORDINARY_TOKENS, (length,), generator=g).tolist()


def best_rate(seconds_per_token: list[float]) -> float:
    """Tokens/s of the fastest repetition: on a shared machine the minimum time is the least disturbed one."""
    return 1.0 / min(seconds_per_token)


def bytes_per_token_from_sizes(sizes: dict[str, int], routed_fraction: float, embedding: str,
                               is_expert: Callable[[str], bool]) -> float:
    """Weight bytes one decoded token reads: every tensor once, except experts (only the routed
    `experts_per_token / num_experts` of each expert tensor, biases included) and the embedding
    (one row, negligible: left out)."""
    total = 0.0
    for name, nbytes in sizes.items():
        if name == embedding:
            continue
        total += nbytes * routed_fraction if is_expert(name) else nbytes
    return total


def kv_bytes_per_token(num_layers: int, sliding: Callable[[int], bool], window: int, kv_size: int,
                       context: int, item_bytes: int) -> float:
    """KV cache bytes one decoded token reads at `context` tokens: K and V of every visible position."""
    return sum(2 * kv_size * item_bytes * (min(context, window) if sliding(i) else context) for i in range(num_layers))


def read_bandwidth(threads: int, gib: float = 1.0, reps: int = 8) -> float:
    """Memory read bandwidth in bytes/s with `threads` threads: the best of `reps` sums over a buffer far larger than any cache."""
    torch.set_num_threads(threads)
    buffer = torch.ones(int(gib * 1024**3) // 4, dtype=torch.float32)
    buffer.sum()  # fault the pages in
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best
