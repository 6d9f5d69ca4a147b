"""llama.cpp's side of `vs_llamacpp.py`: its C API through `llama-cpp-python`'s ctypes bindings.

The low-level API (`llama_decode` on batches we fill ourselves), not the high-level `Llama`
class, so that prompts, greedy decoding and many sequences follow exactly the same schedule as
ossrun's side: what `llama-bench` and `llama-batched-bench` measure, in the same process as the
rest of the run. Context settings are llama.cpp's defaults (flash attention "auto", f16 KV cache)
except batch sizes: n_batch 2048 and n_ubatch 512, as `llama-bench` uses.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

import llama_cpp as L

from workload import Timings, best_rate, bytes_per_token_from_sizes, prompt

N_BATCH, N_UBATCH = 2048, 512


@L.llama_log_callback
def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs every load to stderr; the table is the output."""


class LlamaCpp:
    """One model and one context of `n_seq` parallel sequences of up to `seq_len` tokens each."""

    def __init__(self, path: str | Path, threads: int, seq_len: int, n_seq: int = 1, outputs_all: bool = False):
        L.llama_log_set(_quiet, ctypes.c_void_p())
        L.llama_backend_init()
        model_params = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        params = L.llama_context_default_params()
        params.n_ctx = seq_len * n_seq
        params.n_batch = N_BATCH
        params.n_ubatch = N_UBATCH
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = L.llama_batch_init(N_BATCH, 0, 1)

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def clear(self) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """Entries (seq, position, token, wants logits), at most N_BATCH → logits [V] of those that asked, in order."""
        b = self.batch
        for i, (seq, pos, token, wants) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, wants
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        status = L.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        return [self._logits(i) for i, entry in enumerate(entries) if entry[3]]

    def _logits(self, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()

    def prefill(self, seq: int, tokens: list[int], start: int = 0, all_logits: bool = False) -> list[np.ndarray]:
        """Tokens of one sequence at positions start…, in N_BATCH chunks → the last logits (or all of them)."""
        out = []
        for begin in range(0, len(tokens), N_BATCH):
            chunk = tokens[begin:begin + N_BATCH]
            last = begin + len(chunk) == len(tokens)
            out += self.decode([(seq, start + begin + i, t, all_logits or (last and i == len(chunk) - 1)) for i, t in enumerate(chunk)])
        return out


def _greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def speed(path: str, threads: int, reps: int, gen: int = 32) -> Timings:
    """pp64 then tg32 on it, and pp512 alone, each best of `reps` on fresh contexts (one warm-up first)."""
    engine = LlamaCpp(path, threads, seq_len=1024)
    times: dict[str, list[float]] = {"pp64": [], "pp512": [], f"tg{gen}": []}
    try:
        for rep in range(reps + 1):
            for length in (64, 512):
                engine.clear()
                tokens = prompt(length, seed=1000 * rep + length)
                start = time.perf_counter()
                logits = engine.prefill(0, tokens)[-1]
                elapsed = time.perf_counter() - start
                if length == 64:
                    token, pos, step_start = _greedy(logits), length, time.perf_counter()
                    for _ in range(gen):
                        token = _greedy(engine.decode([(0, pos, token, True)])[0])
                        pos += 1
                    if rep:
                        times[f"tg{gen}"].append((time.perf_counter() - step_start) / gen)
                if rep:
                    times[f"pp{length}"].append(elapsed / length)
    finally:
        engine.close()
    return {name: best_rate(values) for name, values in times.items()}


def concurrency(path: str, threads: int, n: int, prompt_len: int = 64, gen: int = 32) -> float:
    """`n` sequences: their prompts in one batch, then `gen` greedy tokens each, one batch per step → generated tok/s."""
    engine = LlamaCpp(path, threads, seq_len=prompt_len + gen + 32, n_seq=n)
    try:
        best = 0.0
        for rep in range(2):  # the first run warms up
            engine.clear()
            prompts = [prompt(prompt_len, seed=50_000 + 100 * n + i) for i in range(n)]
            start = time.perf_counter()
            entries = [(s, p, t, p == prompt_len - 1) for s, tokens in enumerate(prompts) for p, t in enumerate(tokens)]
            next_tokens = []
            for begin in range(0, len(entries), N_BATCH):
                next_tokens += [_greedy(x) for x in engine.decode(entries[begin:begin + N_BATCH])]
            for step in range(gen - 1):
                logits = engine.decode([(s, prompt_len + step, t, True) for s, t in enumerate(next_tokens)])
                next_tokens = [_greedy(x) for x in logits]
            if rep:
                best = n * gen / (time.perf_counter() - start)
    finally:
        engine.close()
    return best


def depth(path: str, threads: int, depth_tokens: int, gen: int = 32, pp: int = 512) -> Timings:
    """After a `depth_tokens` prompt (not timed): tg32 on it, then pp512 continuing the same sequence, once each."""
    engine = LlamaCpp(path, threads, seq_len=depth_tokens + gen + pp + 64)
    try:
        token = _greedy(engine.prefill(0, prompt(depth_tokens, seed=7))[-1])
        pos, start = depth_tokens, time.perf_counter()
        for _ in range(gen):
            token = _greedy(engine.decode([(0, pos, token, True)])[0])
            pos += 1
        tg = (time.perf_counter() - start) / gen
        start = time.perf_counter()
        engine.prefill(0, [token] + prompt(pp - 1, seed=8), start=pos)
        return {f"tg{gen}": 1 / tg, f"pp{pp}": pp / (time.perf_counter() - start)}
    finally:
        engine.close()


def logits(path: str, threads: int, prompts: list[list[int]]) -> np.ndarray:
    """Next-token logits at every position of every prompt (each prompt its own fresh sequence) → [ΣT, V] fp32."""
    engine = LlamaCpp(path, threads, seq_len=max(map(len, prompts)) + 16)
    try:
        rows = []
        for tokens in prompts:
            engine.clear()
            rows += engine.prefill(0, tokens, all_logits=True)
        return np.stack(rows)
    finally:
        engine.close()


def weight_bytes_per_token(path: str, experts_used: int, num_experts: int) -> float:
    """Bytes of weights one decoded token reads, from the GGUF's own tensor sizes."""
    import gguf

    reader = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    return bytes_per_token_from_sizes(sizes, experts_used / num_experts, embedding="token_embd.weight",
                                      is_expert=lambda name: "_exps." in name)
