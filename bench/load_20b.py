"""Load a 20b-shaped checkpoint and time one decode step: peak resident memory, load time, step time.

    python bench/load_20b.py --model DIR [--dtype bfloat16] [--steps 3]

Writes nothing; prints a table. The checkpoint comes from `ossrun make-model --preset 20b` (or the
real weights). Peak RSS is the process's high-water mark (ru_maxrss), which counts mapped pages
the forward touched.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from rich.console import Console
from rich.table import Table

from ossrun.engine.engine import Engine, EngineOptions
from ossrun.engine.request import Request, SamplingParams
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import GptOss


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    start = time.perf_counter()
    checkpoint = load_checkpoint(args.model)
    model = GptOss.from_checkpoint(checkpoint, dtype)
    load_s = time.perf_counter() - start
    rss_after_load = peak_rss_gib()

    engine = Engine(model, EngineOptions(max_num_seqs=1, kv_cache_bytes=256 * 1024**2, max_model_len=4096))
    engine.add(Request("bench", list(range(1000, 1016)), SamplingParams(max_tokens=args.steps + 1, temperature=0)))
    start = time.perf_counter()
    engine.step()  # prefill of 16 tokens
    prefill_s = time.perf_counter() - start
    step_times = []
    while engine.has_work:
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)

    table = Table(title=f"{args.model} ({args.dtype}, {args.threads} threads)")
    # The first steps fault the mapped experts in from the page cache; the later ones are the steady state.
    warm = sorted(step_times[len(step_times) // 2:])
    for column in ("load s", "peak RSS after load GiB", "prefill 16 tok s", "first decode step s", "warm decode step s (median)", "peak RSS GiB"):
        table.add_column(column, justify="right")
    table.add_row(f"{load_s:.2f}", f"{rss_after_load:.2f}", f"{prefill_s:.2f}", f"{step_times[0]:.2f}", f"{warm[len(warm) // 2]:.2f}", f"{peak_rss_gib():.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
