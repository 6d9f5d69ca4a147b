"""One MoE layer of gpt-oss-20b on the CPU: the exact path's float MXFP4 kernel against the fast int8 kernel.

Shapes are the 20b's (hidden 2880, intermediate 2880, 32 experts, top-4) with random packed weights
made in memory (no checkpoint is read). For 1, 4 and 64 rows and 1 and 2 threads it prints the
time of a layer's experts, the packed expert bytes that step reads (only the routed experts'),
the rate they are read at, and that rate as a share of the machine's read bandwidth measured in
the same run (a large torch sum). Timings are the minimum over --repeats; every repeat routes to
fresh random experts so the weights come from memory, not from cache.

    PYTHONPATH=. python bench/moe_cpu.py [--rows 1 4 64] [--threads 1 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

from ossrun.model import mxfp4
from ossrun.model.config import PRESETS
from ossrun.model.gpt_oss import swiglu
from ossrun.model.kernels import mxfp4_grouped_linear
from ossrun.model.kernels import moe_cpu
from ossrun.model.kernels.build import selected_isa


def set_threads(n: int) -> None:
    """Torch's pool, which the fast kernel follows; the old kernel takes the system OpenMP runtime's setting."""
    torch.set_num_threads(n)
    ctypes.CDLL("libgomp.so.1").omp_set_num_threads(n)


def read_bandwidth(repeats: int) -> float:
    """GB/s of a 1 GiB fp32 sum (streams the tensor once; nothing cached)."""
    data = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


class Layer:
    """Packed 20b-shaped expert weights of one layer and a random routing for `rows` tokens."""

    def __init__(self, seed: int = 0):
        config = PRESETS["20b"]
        g = torch.Generator().manual_seed(seed)
        self.hidden, self.inter, self.experts, self.k = config.hidden_size, config.intermediate_size, config.num_experts, config.experts_per_token
        self.limit = config.swiglu_limit
        scales = (118, 119, 120, 121, 122)  # like the 20b preset: activations stay O(1)
        self.blocks1, self.scales1 = mxfp4.quantize_random(2 * self.inter, self.hidden, self.experts, g, scales)
        self.blocks2, self.scales2 = mxfp4.quantize_random(self.hidden, self.inter, self.experts, g, scales)
        self.bias1 = torch.randn(self.experts, 2 * self.inter, generator=g) * 0.1
        self.bias2 = torch.randn(self.experts, self.hidden, generator=g) * 0.1
        self.expert_bytes = sum(t[0].numel() for t in (self.blocks1, self.scales1, self.blocks2, self.scales2))

        self.q8 = moe_cpu.Q8Experts((self.blocks1, self.scales1, self.bias1), (self.blocks2, self.scales2, self.bias2), self.limit)

    def routing(self, rows: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random distinct top-k experts per row and their softmax weights: [rows, k] each."""
        experts = torch.stack([torch.randperm(self.experts, generator=g)[:self.k] for _ in range(rows)])
        return experts, torch.softmax(torch.randn(rows, self.k, generator=g), dim=-1)

    def old(self, x, experts, weights):
        """The exact path's decode kernel: float MXFP4 (grouping, two grouped calls, SwiGLU and the sum in torch)."""
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.experts)
        present = torch.nonzero(counts).squeeze(1)
        offsets = torch.cat([counts.new_zeros(1), counts[present].cumsum(0)])
        pair_token, pair_weight = order // self.k, weights.reshape(-1)[order]
        h = swiglu(mxfp4_grouped_linear(x[pair_token], offsets, present, self.blocks1, self.scales1, self.bias1), self.limit)
        y = mxfp4_grouped_linear(h, offsets, present, self.blocks2, self.scales2, self.bias2)
        return torch.zeros_like(x).index_add_(0, pair_token, y * pair_weight.unsqueeze(1))

    def new(self, x, experts, weights):
        """The fast path: the whole layer's experts in one native call."""
        return self.q8(x, experts, weights)


def time_path(layer: Layer, path, rows: int, repeats: int) -> tuple[float, float, float]:
    """→ (best wall seconds, packed bytes read in that step, best process CPU seconds).

    CPU time is what the call cost the cores, whatever else the machine runs at the time; on a shared
    machine it is the steadier figure (at 2 threads it includes OpenMP's spinning at barriers)."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, layer.hidden, generator=g)
    path(x, *layer.routing(rows, g))  # warm-up (first call builds the kernel)
    best, best_bytes, best_cpu = float("inf"), 0.0, float("inf")
    for _ in range(repeats):
        routing = layer.routing(rows, g)
        start, start_cpu = time.perf_counter(), time.process_time()
        path(x, *routing)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        best_cpu = min(best_cpu, cpu)
        if elapsed < best:
            best, best_bytes = elapsed, len(routing[0].unique()) * layer.expert_bytes
    return best, best_bytes, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    layer = Layer()
    print(f"20b MoE layer, random weights, kernel variant {selected_isa()}; min of {args.repeats}")
    print(f"{'rows':>4} {'thr':>3} {'read GB/s':>9} | {'old ms':>8} {'new ms':>8} {'speedup':>7} | "
          f"{'MB read':>7} {'new GB/s':>8} {'% of read':>9} | {'new GMAC/s':>10} | {'old cpu ms':>10} {'new cpu ms':>10}")
    for threads in args.threads:
        set_threads(threads)
        bandwidth = read_bandwidth(args.repeats)
        for rows in args.rows:
            old, _, old_cpu = time_path(layer, layer.old, rows, args.repeats)
            new, nbytes, new_cpu = time_path(layer, layer.new, rows, args.repeats)
            macs = rows * layer.k * 3 * layer.hidden * layer.inter
            print(f"{rows:>4} {threads:>3} {bandwidth:>9.1f} | {old * 1e3:>8.2f} {new * 1e3:>8.2f} {old / new:>6.1f}× | "
                  f"{nbytes / 1e6:>7.1f} {nbytes / new / 1e9:>8.1f} {100 * nbytes / new / 1e9 / bandwidth:>8.0f}% | {macs / new / 1e9:>10.1f} | "
                  f"{old_cpu * 1e3:>10.1f} {new_cpu * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
