"""The CPU paged-attention kernel (`attention_cpu.c`): one call per layer for every sequence of a step.

A drop-in for `PagedAttention`'s reference path on the fast precision: it reads K/V straight from
the paged cache through the block tables and never builds a mask or a score matrix, so prefill
cost per token grows with the keys a query sees, not with the square of the context.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ossrun.model.kernels.build import kernels_enabled, load_library, load_selected

_SOURCE = Path(__file__).with_name("attention_cpu.c")
_P, _I = ctypes.c_void_p, ctypes.c_int


def _library(isa: str | None = None) -> ctypes.CDLL | None:
    if not kernels_enabled():
        return None
    lib = load_library(_SOURCE, isa) if isa else load_selected(_SOURCE)
    if lib is not None:
        lib.paged_attention.restype = ctypes.c_int
        lib.paged_attention.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _I, _P, _P, _P, _I, ctypes.c_float, _I]
    return lib


def attention_kernel_available(device: torch.device) -> bool:
    """Whether the kernel runs on `device` (the CPU, with a working C compiler and kernels enabled)."""
    return device.type == "cpu" and _library() is not None


def _index(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_starts: torch.Tensor,
                        query_lens: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
                        first_block: torch.Tensor, context_lens: torch.Tensor, sinks: torch.Tensor, window: int | None,
                        scale: float, isa: str | None = None) -> torch.Tensor:
    """q [T, Hq, D] of every sequence's new tokens (sequence b: rows query_starts[b] … + query_lens[b]) at
    `positions` [T], against caches [blocks, block_size, Hkv, D] (bf16 or fp32) → [T, Hq, D] in q's dtype.

    `block_tables` [B, N] / `first_block` / `context_lens` [B] as `PagedGroup` holds them; the step's
    own k/v must already be in the cache. `isa` forces an instruction-set variant (tests).
    """
    if k_cache.dtype not in (torch.bfloat16, torch.float32) or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"the KV cache must be bf16 or fp32, got {k_cache.dtype}/{v_cache.dtype}")
    lib = _library(isa)
    if lib is None:
        raise RuntimeError("the CPU attention kernel is not available (no C compiler, or OSSRUN_KERNELS=0)")
    tokens, n_heads, dim = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    qf = q.float().contiguous()
    out = torch.empty(tokens, n_heads, dim, dtype=torch.float32)
    starts, lens, pos = _index(query_starts), _index(query_lens), _index(positions)
    tables, first, context = _index(block_tables), _index(first_block), _index(context_lens)
    sinks = sinks.float().contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # views of the pool: no copy
    status = lib.paged_attention(qf.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                 int(k_cache.dtype == torch.bfloat16), block_size, n_kv, n_heads // n_kv, dim, len(starts),
                                 starts.data_ptr(), lens.data_ptr(), pos.data_ptr(), tables.data_ptr(), tables.shape[1],
                                 first.data_ptr(), context.data_ptr(), sinks.data_ptr(), int(window or 0), float(scale),
                                 torch.get_num_threads())
    if status != 0:
        raise ValueError(f"paged_attention rejected q={tuple(q.shape)} cache={tuple(k_cache.shape)} (status {status})")
    return out.to(q.dtype)
