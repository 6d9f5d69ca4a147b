"""Throughput with LoRA adapters mixed into one batch vs the base model alone, same weights, same run.

    python bench/lora.py [--requests 16] [--adapters 4] [--rank 16] [--max-tokens 32]
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
from ossrun.engine.request import Request, SamplingParams
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import GptOss
from ossrun.model.lora import write_random_adapter
from ossrun.model.resolve import preset_dir


def run(model: GptOss, adapters: dict[str, Path], loras: list[str | None], max_tokens: int) -> float:
    engine = Engine(model, EngineOptions(max_num_seqs=64, kv_dtype=torch.float32, kv_cache_bytes=1024**3, max_model_len=4096))
    for name, path in adapters.items():
        engine.adapters.register(name, path)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    results = engine.generate([Request(str(i), torch.randint(0, 201088, (64,), generator=g).tolist(),
                                       SamplingParams(max_tokens=max_tokens, temperature=0), lora=lora) for i, lora in enumerate(loras)])
    elapsed = time.perf_counter() - start
    return sum(len(events) for events in results.values()) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    model = GptOss.from_checkpoint(load_checkpoint(preset_dir("small")), torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {f"a{i}": write_random_adapter(model.config, Path(tmp) / f"a{i}", rank=args.rank, seed=i) for i in range(args.adapters)}
        base = run(model, adapters, [None] * args.requests, args.max_tokens)
        mixed = run(model, adapters, [f"a{i % args.adapters}" for i in range(args.requests)], args.max_tokens)
    table = Table(title=f"small preset, {args.requests} concurrent, rank {args.rank}, {args.max_tokens} new tokens")
    for column in ("batch", "tok/s", "vs base"):
        table.add_column(column, justify="right")
    table.add_row("base only", f"{base:.1f}", "1.00x")
    table.add_row(f"{args.adapters} adapters mixed", f"{mixed:.1f}", f"{mixed / base:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
