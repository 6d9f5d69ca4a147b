"""Generated tokens/s and time to first token: ossrun's engine vs Hugging Face `generate`, same weights, same run.

    python bench/throughput.py [--concurrency 1 4 16 64] [--prompt-len 64] [--max-tokens 32] [--dtype float32]
                               [--with-20b DIR] [--bandwidth-gbs 29.9]

The `small` preset is written once (HF layout) to the cache; both engines load it. Every request is
greedy with a distinct random prompt. ossrun runs all N requests through continuous batching; HF runs
them as one padded `generate` batch (its best case). TTFT for ossrun is the mean time from submission
to a request's first token; for HF it is the time of a 1-token `generate` of the same batch.
The optional 20b rows run only ossrun (HF would need ~36 GB to dequantise the experts) and are
compared with the memory-bandwidth ceiling: bytes read per step / bandwidth.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from ossrun.engine.engine import Engine, EngineOptions
from ossrun.engine.request import Request, SamplingParams
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.config import ModelConfig
from ossrun.model.gpt_oss import GptOss
from ossrun.model.resolve import preset_dir


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def run_ossrun(model: GptOss, batch: list[list[int]], max_tokens: int, kv_dtype: torch.dtype) -> tuple[float, float]:
    """→ (generated tokens/s, mean time to first token in s)."""
    engine = Engine(model, EngineOptions(max_num_seqs=max(64, len(batch)), max_tokens_per_step=2048, kv_dtype=kv_dtype,
                                         kv_cache_bytes=1024**3, max_model_len=4096, prefix_caching=False))
    start = time.perf_counter()
    for i, prompt in enumerate(batch):
        engine.add(Request(str(i), prompt, SamplingParams(max_tokens=max_tokens, temperature=0)))
    first: dict[str, float] = {}
    generated = 0
    while engine.has_work:
        for event in engine.step():
            if event.token_id is not None:
                generated += 1
                first.setdefault(event.request_id, time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    return generated / elapsed, sum(first.values()) / len(first)


def run_hf(hf, batch: list[list[int]], max_tokens: int) -> tuple[float, float]:
    ids = torch.tensor(batch)  # equal lengths: no padding needed
    with torch.no_grad():
        start = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
        elapsed = time.perf_counter() - start
    generated = (out.shape[1] - ids.shape[1]) * len(batch)
    return generated / elapsed, ttft


def bytes_per_step(config: ModelConfig, batch: int, weight_bytes: int = 2) -> float:
    """Weights read by one decode step of `batch` sequences (expected distinct experts under uniform routing)."""
    c = config
    attention = c.num_hidden_layers * (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size) * weight_bytes
    unembedding = c.vocab_size * c.hidden_size * weight_bytes
    expert = (2 * c.intermediate_size * c.hidden_size + c.hidden_size * c.intermediate_size) * 4.25 / 8
    distinct = c.num_experts * (1 - (1 - c.experts_per_token / c.num_experts) ** batch)
    return attention + unembedding + c.num_hidden_layers * distinct * expert


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--with-20b", default=None, help="a 20b checkpoint dir (ossrun make-model --preset 20b)")
    parser.add_argument("--bandwidth-gbs", type=float, default=29.9, help="memory read bandwidth (2 threads here: 29.9)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = preset_dir("small", layout="hf")
    ours = GptOss.from_checkpoint(load_checkpoint(path), dtype)
    # Dequantised on request: transformers ≥ 5.25 with Triton installed reaches for a hub kernel on the CPU.
    hf = GptOssForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=Mxfp4Config(dequantize=True))
    hf = hf.to(dtype).eval()

    table = Table(title=f"small preset, {args.dtype}, prompt {args.prompt_len}, {args.max_tokens} new tokens, {torch.get_num_threads()} threads")
    for column in ("model", "concurrent", "ossrun tok/s", "HF tok/s", "ratio", "ossrun TTFT s", "HF TTFT s"):
        table.add_column(column, justify="right")
    for n in args.concurrency:
        batch = prompts(n, args.prompt_len, ours.config.vocab_size, seed=n)
        ours_tps, ours_ttft = run_ossrun(ours, batch, args.max_tokens, dtype)
        hf_tps, hf_ttft = run_hf(hf, batch, args.max_tokens)
        table.add_row("small", str(n), f"{ours_tps:.1f}", f"{hf_tps:.1f}", f"{ours_tps / hf_tps:.2f}x", f"{ours_ttft:.3f}", f"{hf_ttft:.3f}")

    if args.with_20b:
        del hf
        big = GptOss.from_checkpoint(load_checkpoint(args.with_20b), torch.bfloat16)
        for n in (1, 8):
            batch = prompts(n, 16, big.config.vocab_size, seed=100 + n)
            tps, ttft = run_ossrun(big, batch, 8, torch.bfloat16)
            ceiling = n * args.bandwidth_gbs * 1e9 / bytes_per_step(big.config, n)
            table.add_row("20b (bf16)", str(n), f"{tps:.2f}", "n/a", f"{tps / ceiling:.0%} of ceiling {ceiling:.1f}", f"{ttft:.2f}", "")
    Console().print(table)


if __name__ == "__main__":
    main()
