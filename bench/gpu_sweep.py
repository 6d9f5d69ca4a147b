"""Batch-1 MoE tiles on the GPU: time one 20b projection pair (4 experts routed) per tile shape.

    PYTHONPATH=. python bench/gpu_sweep.py   → a table, and the fastest "N,K,W" on the last line
"""

from __future__ import annotations

import os

import torch
import triton.testing

from ossrun.model import mxfp4
from ossrun.model.kernels import triton_moe

TILES = ["64,128,4", "32,256,4", "32,128,4", "16,256,4", "16,512,4", "32,512,8", "16,256,2"]


def main() -> None:
    g = torch.Generator().manual_seed(0)
    blocks1, scales1 = (t.cuda() for t in mxfp4.quantize_random(5760, 2880, 32, g, (120, 121, 122)))
    blocks2, scales2 = (t.cuda() for t in mxfp4.quantize_random(2880, 2880, 32, g, (116, 117, 118)))
    bias1 = torch.randn(32, 5760, device="cuda", dtype=torch.bfloat16)
    bias2 = torch.randn(32, 2880, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(1, 2880, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(1, 32, device="cuda", dtype=torch.bfloat16)
    bytes_read = 4 * (5760 + 2880) * 1440 * 17 / 16
    best = None
    for tile in TILES:
        os.environ["OSSRUN_MOE_TILE"] = tile
        fn = lambda: triton_moe.moe_experts(t, logits, 4, (blocks1, scales1, bias1), (blocks2, scales2, bias2), 7.0)  # noqa: E731
        ms = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
        print(f"tile {tile:10s}: {ms * 1000:7.1f} us per MoE layer, {bytes_read / ms / 1e6:6.0f} GB/s", flush=True)
        if best is None or ms < best[1]:
            best = (tile, ms)
    print(best[0])


if __name__ == "__main__":
    main()
