"""The dense (non-expert) layers of 20b on the CPU: bf16 F.linear vs the Q8 kernel vs torch's int8 weight-only op.

    python bench/dense_cpu.py [--rows 1 64] [--threads 2] [--repeats 5] [--shapes qkv out router unembedding] [--clock wall|cpu]

Random weights in memory at the 20b shapes (no checkpoint). Each cell is the best of `--repeats`
calls. GB/s counts the weight bytes each call must read (bf16: 2 per weight; Q8: 1 + 2/32;
int8pack: 1 + 4 per output row), next to the machine's read bandwidth measured in the same run
(a sum over a 1 GiB buffer), so "share" is how close a call gets to the memory ceiling.
The int8pack column uses bf16 activations (its fp32 path is several times slower here).
`--clock cpu` times with the process's CPU time: with `--threads 1` on a busy shared machine it
counts only the cycles the call got, so ratios stay meaningful when wall time is mostly waiting.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from ossrun.model.kernels.build import selected_isa
from ossrun.model.kernels.dense_cpu import q8_kernel_available, q8_linear, quantize_weight

# name → (in_features K, out_features N) of gpt-oss-20b
SHAPES = {"qkv": (2880, 5120), "out": (4096, 2880), "router": (2880, 32), "unembedding": (2880, 201088)}


CLOCK = time.perf_counter


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def read_bandwidth(repeats: int) -> float:
    """GB/s of a streaming read (a float sum over 1 GiB: far beyond every cache)."""
    buffer = torch.ones(2**28, dtype=torch.float32)
    return buffer.numel() * 4 / best_time(lambda: buffer.sum(), repeats) / 1e9


def int8pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel int8 for `torch.ops.aten._weight_int8pack_mm` (values [N, K], scales [N])."""
    w = weight.float()
    scales = w.abs().amax(dim=1) / 127.0
    return torch.round(w / scales.clamp_min(1e-12).unsqueeze(1)).to(torch.int8), scales


def bench_shape(name: str, rows: list[int], repeats: int, bandwidth: float, table: Table) -> None:
    k, n = SHAPES[name]
    weight = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    q8 = quantize_weight(weight)
    packed, channel_scales = int8pack(weight)
    channel_scales_bf16 = channel_scales.bfloat16()
    sizes = {"bf16": 2 * n * k, "q8": q8.nbytes, "int8pack": n * k + 4 * n}
    for m in rows:
        x = torch.randn(m, k)
        xb = x.bfloat16()
        times = {
            "bf16": best_time(lambda: F.linear(xb, weight), repeats),
            "q8": best_time(lambda: q8_linear(x, q8), repeats),
            "int8pack": best_time(lambda: torch.ops.aten._weight_int8pack_mm(xb, packed, channel_scales_bf16), repeats),
        }
        cells = []
        for kind in ("bf16", "q8", "int8pack"):
            gbs = sizes[kind] / times[kind] / 1e9
            cells.append(f"{times[kind] * 1e3:.2f} ms {gbs:.1f} GB/s {gbs / bandwidth:.0%}")
        table.add_row(name, f"{k}→{n}", str(m), *cells, f"{times['bf16'] / times['q8']:.2f}×", f"{times['bf16'] / times['int8pack']:.2f}×")
    del weight, q8, packed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if not q8_kernel_available(torch.device("cpu")):
        raise SystemExit("the Q8 kernel is not available (no C compiler, or OSSRUN_KERNELS=0)")
    bandwidth = read_bandwidth(args.repeats)
    table = Table(title=f"20b dense shapes, {args.threads} threads, ISA {selected_isa()}, {args.clock} clock, "
                        f"read bandwidth {bandwidth:.1f} GB/s")
    for column in ("layer", "K→N", "rows", "bf16 F.linear", "Q8 kernel", "int8pack (bf16 x)", "Q8 speed-up", "int8pack speed-up"):
        table.add_column(column)
    for name in args.shapes:
        bench_shape(name, args.rows, args.repeats, bandwidth, table)
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
