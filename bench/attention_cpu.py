"""One 20b attention layer on the CPU at depth: the paged kernel's instruction-set variants against the reference.

    PYTHONPATH=. python bench/attention_cpu.py [--depths 0 4096 16384] [--queries 512] [--threads 2] [--repeats 3]
                                               [--window 0] [--reference-max 4096] [--variants avx512vnni avx512bf16]
                                               [--clock wall|cpu]

gpt-oss-20b's attention shapes (64 query heads over 8 KV heads, head_dim 64, sinks) with random keys and values in a
bf16 paged cache of 16-token blocks: `--queries` new tokens (a prompt chunk) after `--depths` cached tokens, one
call of `attention_cpu.paged_attention_cpu` per variant this CPU builds (portable is left out: it is the fallback,
not a contender), and the exact path's `attention_with_sinks` over the gathered keys as the peer, up to
`--reference-max` of depth (its score matrix grows with depth x queries). Each cell is the best of `--repeats`;
GMAC/s counts the QK and PV multiply-adds the causal mask leaves. `--clock cpu` times the process's CPU seconds instead of the wall
clock (comparable between variants on a busy machine, at one thread). `bench/long_context.py` times the engine on the
`tiny` preset, whose 16-wide heads make the softmax, not these products, the cost: this is the 20b-shaped view.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from ossrun.model.attention import attention_with_sinks, visibility
from ossrun.model.kernels.attention_cpu import paged_attention_cpu
from ossrun.model.kernels.build import supported_isas

N_KV, GROUP, DIM, BLOCK = 8, 8, 64, 16


def make_case(depth: int, queries: int, window: int | None, seed: int = 0) -> dict:
    """One sequence of depth + queries tokens in a shuffled paged cache, the last `queries` of them queried."""
    g = torch.Generator().manual_seed(seed)
    context = depth + queries
    blocks = -(-context // BLOCK)
    k_cache = torch.randn(blocks + 1, BLOCK, N_KV, DIM, generator=g).bfloat16()
    v_cache = torch.randn(blocks + 1, BLOCK, N_KV, DIM, generator=g).bfloat16()
    table = (torch.randperm(blocks, generator=g) + 1)[None]
    return dict(q=torch.randn(queries, N_KV * GROUP, DIM, generator=g), k_cache=k_cache, v_cache=v_cache,
                query_starts=torch.tensor([0]), query_lens=torch.tensor([queries]), positions=torch.arange(depth, context),
                block_tables=table, first_block=torch.tensor([0]), context_lens=torch.tensor([context]),
                sinks=torch.randn(N_KV * GROUP, generator=g), window=window, scale=DIM ** -0.5)


def reference(case: dict) -> torch.Tensor:
    """The exact path's computation: keys gathered in position order, the mask, `attention_with_sinks`."""
    context = int(case["context_lens"][0])
    k = case["k_cache"][case["block_tables"][0]].reshape(-1, N_KV, DIM)[:context].float()
    v = case["v_cache"][case["block_tables"][0]].reshape(-1, N_KV, DIM)[:context].float()
    allowed = visibility(case["positions"], torch.arange(context), case["window"])
    return attention_with_sinks(case["q"][None], k[None], v[None], case["sinks"], allowed[None], case["scale"])[0]


def best_of(repeats: int, run, clock=time.perf_counter) -> float:
    """The fastest of `repeats` calls after one untimed call (the first builds and loads the variant's library)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run()
        best = min(best, clock() - start)
    return best


def multiply_adds(depth: int, queries: int, window: int | None) -> float:
    """QK and PV multiply-adds of the visible (query, key) pairs, every query head."""
    seen = sum(min(depth + i + 1, window or depth + i + 1) for i in range(queries))
    return 2.0 * seen * N_KV * GROUP * DIM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 4096, 16384])
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=0, help="sliding window (0: full attention, as 20b's even layers)")
    parser.add_argument("--reference-max", type=int, default=4096)
    parser.add_argument("--variants", nargs="+", help="the variants to time (default: every one this CPU builds)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    window = args.window or None
    variants = args.variants or [isa for isa in supported_isas() if isa != "portable"] or ["portable"]
    table = Table(title=f"20b attention layer, {args.queries} queries, bf16 cache, {args.threads} threads, "
                        f"{'window ' + str(window) if window else 'full attention'}; {args.clock} ms (GMAC/s)")
    table.add_column("depth", justify="right")
    for name in [*variants, "reference"]:
        table.add_column(name, justify="right")
    for depth in args.depths:
        case = make_case(depth, args.queries, window)
        macs = multiply_adds(depth, args.queries, window)
        cells = []
        for isa in variants:
            seconds = best_of(args.repeats, lambda: paged_attention_cpu(**case, isa=isa), clock)
            cells.append(f"{seconds * 1e3:.0f} ({macs / seconds / 1e9:.0f})")
        if depth <= args.reference_max:
            seconds = best_of(args.repeats, lambda: reference(case), clock)
            cells.append(f"{seconds * 1e3:.0f} ({macs / seconds / 1e9:.0f})")
        else:
            cells.append("skipped")
        table.add_row(str(depth), *cells)
    Console().print(table)


if __name__ == "__main__":
    main()
