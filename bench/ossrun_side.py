"""ossrun's side of `vs_llamacpp.py`: the product path, `Engine` over `GptOss`, on the same schedule as llama.cpp's side.

Each workload mirrors the function of the same name in `llamacpp_side.py`: same prompts, same
greedy decoding, same token counts, timed around the same work.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ossrun.engine.async_engine import resolve_dtype
from ossrun.engine.engine import Engine, EngineOptions
from ossrun.engine.request import Request, SamplingParams, TokenEvent
from ossrun.model.attention import PagedAttention, PagedGroup, paged_kernel
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import GptOss
from workload import Timings, best_rate, bytes_per_token_from_sizes, prompt

EXPERT_TENSORS = ("mlp1_", "mlp2_")  # every per-expert tensor of MoE (blocks, scales, biases, any repacked copy)


def load(model_dir: str | Path, precision: str) -> GptOss:
    """The model as `ossrun serve --precision P` builds it (its default dtype for that precision)."""
    return GptOss.from_checkpoint(load_checkpoint(model_dir), resolve_dtype(precision), "cpu", precision)


def _engine(model: GptOss, max_model_len: int, max_num_seqs: int = 1, prefix_caching: bool = False) -> Engine:
    """The engine's defaults (512 tokens a step, bf16 or fp32 KV as the model), sized for the workload.

    The KV pools are sized from `max_num_seqs × max_model_len`, which must hold at least one step's
    tokens: hence the 1024-token floor.
    """
    return Engine(model, EngineOptions(max_num_seqs=max_num_seqs, kv_dtype=model.dtype, max_model_len=max(max_model_len, 1024),
                                       prefix_caching=prefix_caching))


def _greedy(tokens: list[int], max_tokens: int, request_id: str) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=max_tokens, temperature=0))


def _step(engine: Engine) -> tuple[list[TokenEvent], float]:
    start = time.perf_counter()
    events = engine.step()
    return events, time.perf_counter() - start


def _decode_rest(engine: Engine) -> tuple[list[int], float, int]:
    """Step until done → (generated tokens, seconds, tokens generated in those steps)."""
    tokens, seconds = [], 0.0
    while engine.has_work:
        events, elapsed = _step(engine)
        seconds += elapsed
        tokens += [e.token_id for e in events if e.token_id is not None]
    return tokens, seconds, len(tokens)


def speed(model: GptOss, reps: int, gen: int = 32) -> Timings:
    """pp64 then tg32 on it, and pp512 alone, each best of `reps` (one warm-up run first)."""
    engine = _engine(model, max_model_len=1024)
    times: dict[str, list[float]] = {"pp64": [], "pp512": [], f"tg{gen}": []}
    for rep in range(reps + 1):
        for length in (64, 512):
            engine.add(_greedy(prompt(length, seed=1000 * rep + length), gen + 1 if length == 64 else 1, f"{rep}-{length}"))
            events, elapsed = _step(engine)  # max_tokens_per_step ≥ 512: the whole prompt in one step
            if not any(e.token_id is not None for e in events):
                raise RuntimeError("the prompt did not fit in one step")
            _, seconds, n = _decode_rest(engine)
            if rep:
                times[f"pp{length}"].append(elapsed / length)
                if length == 64:
                    times[f"tg{gen}"].append(seconds / n)
    return {name: best_rate(values) for name, values in times.items()}


def concurrency(model: GptOss, n: int, prompt_len: int = 64, gen: int = 32) -> float:
    """`n` requests submitted at once, `gen` greedy tokens each, continuous batching → generated tok/s (best of 2 after a warm-up)."""
    engine = _engine(model, max_model_len=prompt_len + gen + 32, max_num_seqs=max(n, 1))
    best = 0.0
    for rep in range(2):
        start = time.perf_counter()
        for i in range(n):
            engine.add(_greedy(prompt(prompt_len, seed=50_000 + 100 * n + i), gen, f"{rep}-{i}"))
        _, _, generated = _decode_rest(engine)
        if rep:
            best = generated / (time.perf_counter() - start)
    return best


def depth(model: GptOss, depth_tokens: int, gen: int = 32, pp: int = 512) -> Timings:
    """After a `depth_tokens` prompt (not timed): tg32 on it, then pp512 continuing the same sequence
    (a second request whose prompt extends the first; the prefix cache holds the first's KV), once each."""
    engine = _engine(model, max_model_len=depth_tokens + gen + pp + 64, prefix_caching=True)
    first = prompt(depth_tokens, seed=7)
    engine.add(_greedy(first, gen + 1, "depth"))
    generated: list[int] = []
    while not generated:  # the prompt, in chunks of max_tokens_per_step
        generated += [e.token_id for e in engine.step() if e.token_id is not None]
    rest, seconds, n = _decode_rest(engine)
    tg = n / seconds
    engine.add(_greedy(first + generated + rest + prompt(pp - 1, seed=8), 1, "continue"))
    events, seconds = [], 0.0
    while engine.has_work:
        step_events, elapsed = _step(engine)
        events += step_events
        seconds += elapsed
    computed = depth_tokens + 1 + n + pp - 1 - events[-1].num_cached_tokens
    return {f"tg{gen}": tg, f"pp{pp}": computed / seconds}


def logits(model: GptOss, prompts: list[list[int]]) -> np.ndarray:
    """Next-token logits at every position of every prompt → [ΣT, V] fp32, each prompt in one step over a paged
    cache with the attention the engine picks for this precision: the path a served request's prompt takes (on
    the CPU's fast precision, the native blocks)."""
    c, block = model.config, 16
    kernel = paged_kernel(model.device, model.precision)
    rows = []
    for tokens in prompts:
        ids, positions = torch.tensor(tokens), torch.arange(len(tokens))
        blocks = (len(tokens) + block - 1) // block + 1  # block 0 is the engine's null block
        caches = [tuple(torch.zeros(blocks, block, c.num_key_value_heads, c.head_dim, dtype=model.dtype) for _ in range(2))
                  for _ in model.blocks]
        table = torch.arange(1, blocks).unsqueeze(0)
        group = PagedGroup(table[0, positions // block] * block + positions % block, table, torch.zeros(1, dtype=torch.long),
                           torch.tensor([len(tokens)]))
        attention = PagedAttention(caches, block, {"full": group, "sliding": group}, [0], [len(tokens)], positions, kernel=kernel)
        attention.prepare()
        rows.append(model(ids, positions, attention).float().numpy())
    return np.concatenate(rows)


def weight_bytes_per_token(model: GptOss) -> float:
    """Bytes of weights one decoded token reads, from the tensors the model holds."""
    sizes = {name: t.numel() * t.element_size() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    c = model.config
    return bytes_per_token_from_sizes(sizes, c.experts_per_token / c.num_experts, embedding="embedding",
                                      is_expert=lambda name: any(part in name for part in EXPERT_TENSORS))
