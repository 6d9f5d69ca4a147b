"""Long contexts on the `tiny` preset: prefill cost per token and decode step time by depth, reference vs kernel.

    PYTHONPATH=. python bench/long_context.py [--depths 1024 2048 4096 8192 16384 32768] [--ref-max 8192]
                                              [--decode 16] [--chunk 512] [--threads 2]

One engine per (attention, depth) on the fast precision (bf16 weights and KV cache): the reference
attention (`attention_with_sinks` over gathered keys, what the exact path runs) and the CPU kernel
(`ossrun/model/kernels/attention_cpu.c`). A random prompt of `depth` tokens is prefilled in chunks of
`--chunk`; then `--decode` greedy tokens are generated one step each. Prefill is timed to the first
token; decode is the fastest step after it (the machine is shared: the minimum is the least noisy). The reference is skipped above `--ref-max` (it grows
quadratically: 8k takes about half a minute on 2 cores). The `tiny` model has 64-wide hidden states,
so attention is most of its work at depth: what this shows is the attention's cost, not the MLPs'.
On a shared, oversubscribed machine `--threads 1` gives the stabler figures: with 2 threads every
parallel region waits for both threads to be scheduled, and that wait dominates short calls.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ossrun.engine.engine import Engine, EngineOptions
from ossrun.model.attention import PagedAttention, PagedGroup, paged_kernel
from ossrun.engine.request import Request, SamplingParams
from ossrun.model.checkpoint import load_checkpoint, write_random_checkpoint
from ossrun.model.config import PRESETS
from ossrun.model.gpt_oss import GptOss


def run(model: GptOss, depth: int, decode: int, chunk: int, kernel: bool) -> tuple[float, float]:
    """→ (prefill seconds per prompt token, median decode step seconds) at `depth` tokens of context."""
    engine = Engine(model, EngineOptions(max_num_seqs=1, max_tokens_per_step=chunk, kv_cache_bytes=256 * 1024**2,
                                         max_model_len=max(depth + decode + 16, 2 * chunk), prefix_caching=False))
    if not kernel:
        engine.runner.attention_kernel = None
    elif engine.runner.attention_kernel is None:
        raise SystemExit("the CPU attention kernel is not available here (no C compiler, or OSSRUN_KERNELS=0)")
    prompt = torch.randint(0, model.config.vocab_size, (depth,), generator=torch.Generator().manual_seed(depth)).tolist()
    engine.add(Request("r", prompt, SamplingParams(max_tokens=decode + 1, temperature=0)))
    start = time.perf_counter()
    prefill, steps = None, []
    while engine.has_work:
        before = time.perf_counter()
        events = engine.step()
        if prefill is None:
            if any(e.token_id is not None for e in events):
                prefill = time.perf_counter() - start
        else:
            steps.append(time.perf_counter() - before)
    return prefill / depth, min(steps)


def attention_only(model: GptOss, depth: int, queries: int, kernel: bool, repeats: int = 7) -> float:
    """Seconds for one full and one sliding layer's attention of `queries` new tokens ending at `depth` (min of repeats)."""
    c, bs = model.config, 16
    blocks = -(-depth // bs)
    g = torch.Generator().manual_seed(0)
    cache = [(torch.randn(blocks + 1, bs, c.num_key_value_heads, c.head_dim, generator=g).bfloat16(),
              torch.randn(blocks + 1, bs, c.num_key_value_heads, c.head_dim, generator=g).bfloat16())]
    begin = depth - queries
    positions = torch.arange(begin, depth)
    slots = positions + bs  # block i of the sequence is physical block i + 1 (0 is the null block)

    def group(first: int) -> PagedGroup:
        return PagedGroup(slot_mapping=slots, block_tables=torch.arange(first + 1, blocks + 1)[None], first_block=torch.tensor([first]),
                          context_lens=torch.tensor([depth]))

    attention = PagedAttention(caches=cache, block_size=bs, positions=positions, query_starts=[0], query_lens=[queries],
                               groups={"full": group(0), "sliding": group(max(0, begin - c.sliding_window + 1) // bs)},
                               kernel=paged_kernel(model.device, "fast") if kernel else None)
    attention.prepare()
    q = torch.randn(queries, c.num_attention_heads, c.head_dim, generator=g).bfloat16()
    k = torch.randn(queries, c.num_key_value_heads, c.head_dim, generator=g).bfloat16()
    sinks = torch.zeros(c.num_attention_heads)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for window in (None, c.sliding_window):
            attention(0, q, k, k, sinks, window, c.head_dim ** -0.5)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--ref-max", type=int, default=8192, help="largest depth the reference attention runs at")
    parser.add_argument("--short", type=int, default=64, help="the short context decode is compared against")
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=512, help="max_tokens_per_step (prefill chunk)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-engine", action="store_true", help="only the attention-alone table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = PRESETS["tiny"]
        model = GptOss.from_checkpoint(load_checkpoint(write_random_checkpoint(config, Path(tmp) / "tiny")), torch.bfloat16,
                                       precision="fast")
    run(model, 64, 2, args.chunk, True)  # warm up: builds the kernel, touches the code paths
    attention_table(model, args)
    if not args.no_engine:
        engine_table(model, args)


def attention_table(model: GptOss, args: argparse.Namespace) -> None:
    table = Table(title=f"attention alone: one full + one sliding layer, bf16 cache, {args.chunk}-token chunk / 1-token decode")
    for column in ("context", "ref chunk µs/tok", "kernel chunk µs/tok", "speed-up", "ref decode ms", "kernel decode ms", "speed-up"):
        table.add_column(column, justify="right")
    for depth in [args.short, *args.depths]:
        chunk = min(args.chunk, depth)
        kp, kd = attention_only(model, depth, chunk, True) / chunk, attention_only(model, depth, 1, True)
        if depth <= args.ref_max:
            rp, rd = attention_only(model, depth, chunk, False) / chunk, attention_only(model, depth, 1, False)
            table.add_row(str(depth), f"{rp * 1e6:.1f}", f"{kp * 1e6:.1f}", f"{rp / kp:.1f}×", f"{rd * 1e3:.3f}", f"{kd * 1e3:.3f}", f"{rd / kd:.1f}×")
        else:
            table.add_row(str(depth), "skipped", f"{kp * 1e6:.1f}", "", "skipped", f"{kd * 1e3:.3f}", "")
    Console().print(table)


def engine_table(model: GptOss, args: argparse.Namespace) -> None:
    table = Table(title=f"tiny preset, bf16, {args.threads} threads, prefill chunks of {args.chunk}")
    for column in ("context", "ref prefill µs/tok", "kernel prefill µs/tok", "prefill speed-up",
                   "ref decode ms/step", "kernel decode ms/step", "decode speed-up", "kernel decode / short"):
        table.add_column(column, justify="right")
    short = {kernel: run(model, args.short, args.decode, args.chunk, kernel)[1] for kernel in (False, True)}
    table.add_row(str(args.short), "", "", "", f"{short[False] * 1e3:.2f}", f"{short[True] * 1e3:.2f}",
                  f"{short[False] / short[True]:.2f}×", "1.00")
    for depth in args.depths:
        kp, kd = run(model, depth, args.decode, args.chunk, True)
        if depth <= args.ref_max:
            rp, rd = run(model, depth, args.decode, args.chunk, False)
            ref = (f"{rp * 1e6:.0f}", f"{rd * 1e3:.2f}", f"{rp / kp:.1f}×", f"{rd / kd:.1f}×")
        else:
            ref = ("skipped", "skipped", "", "")
        table.add_row(str(depth), ref[0], f"{kp * 1e6:.0f}", ref[2], ref[1], f"{kd * 1e3:.2f}", ref[3], f"{kd / short[True]:.2f}")
        Console().print(f"depth {depth} done", style="dim")
    Console().print(table)


if __name__ == "__main__":
    main()
