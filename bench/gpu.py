"""The 20b preset on one GPU: batch-1 decode against the HBM ceiling, and throughput under concurrency.

    PYTHONPATH=. python bench/gpu.py [--preset 20b] [--concurrency 1 16 64 256] [--prompt-len 512]
                                     [--max-tokens 128] [--paths kernel eager] [--bandwidth-tbs 4.8]
                                     [--max-seconds 60]

Random weights of the preset are made directly in GPU memory (no 13 GB file), once; the `eager`
path (precision "exact": the PyTorch reference, experts expanded when routed to) and the `kernel`
path (precision "fast": the Triton kernels, decode steps replayed from CUDA graphs; `kernel-nograph`
without the graphs) share them. Requests are token ids (no harmony),
distinct random prompts, greedy, no stop token, so each generates exactly --max-tokens.

Batch-1 decode: the time between a request's first and last token over the tokens in between,
against the ceiling bandwidth / bytes read per token (weights touched at batch 1, per
../shared/spec/gpt-oss-model.md, plus the KV cache at the mean context). Concurrency rows: all N
requests submitted at once; output tok/s = generated tokens / wall time, total tok/s counts the
prompt tokens too (what vLLM's benchmark calls total token throughput). A run that passes
--max-seconds stops there and is marked partial (its rate is over the tokens it did generate).
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback

import torch

from ossrun.engine.engine import Engine, EngineOptions
from ossrun.engine.request import Request, SamplingParams
from ossrun.model.checkpoint import random_tensors
from ossrun.model.config import PRESETS, ModelConfig
from ossrun.model.gpt_oss import GptOss
from ossrun.model.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK

# path → (precision, CUDA graphs for decode steps)
PATHS = {"eager": ("exact", False), "kernel": ("fast", True), "kernel-nograph": ("fast", False)}


def bytes_per_token(c: ModelConfig, context: int, kv_bytes: int = 2) -> int:
    """Bytes a batch-1 decode step must read: attention and unembedding weights (bf16), the k routed
    experts (packed blocks + scales + bf16 biases), router, and the KV cache at `context`."""
    attention = c.num_hidden_layers * ((c.q_size + 2 * c.kv_size) * c.hidden_size + c.hidden_size * c.q_size) * 2
    per_matrix = lambda rows, cols: rows * (cols // BLOCK_SIZE) * (BYTES_PER_BLOCK + 1) + rows * 2  # noqa: E731
    expert = per_matrix(2 * c.intermediate_size, c.hidden_size) + per_matrix(c.hidden_size, c.intermediate_size)
    experts = c.num_hidden_layers * c.experts_per_token * expert
    router = c.num_hidden_layers * c.num_experts * c.hidden_size * 2
    unembedding = c.vocab_size * c.hidden_size * 2
    sliding = sum(c.is_sliding(i) for i in range(c.num_hidden_layers))
    kv_tokens = sliding * min(context, c.sliding_window) + (c.num_hidden_layers - sliding) * context
    kv = kv_tokens * 2 * c.kv_size * kv_bytes
    return attention + experts + router + unembedding + kv


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_bandwidth(device: torch.device) -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (the practical ceiling)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del src, dst
    return 2 * 20 * 2**30 / elapsed


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def make_engine(model: GptOss, concurrency: int, args) -> Engine:
    return Engine(model, EngineOptions(max_num_seqs=max(concurrency, 1), max_tokens_per_step=args.step_tokens, cuda_graphs=args.graphs,
                                       kv_cache_bytes=int(args.kv_gib * 2**30), kv_dtype=torch.bfloat16,
                                       max_model_len=args.step_tokens + args.prompt_len + args.max_tokens, prefix_caching=False))


def run(model: GptOss, concurrency: int, args, seed: int) -> dict:
    """N requests at once → output and total tok/s, and the batch-1-style decode rate of request 0."""
    engine = make_engine(model, concurrency, args)
    batch = prompts(concurrency, args.prompt_len, model.config.vocab_size, seed)
    sync(model.device)
    start = time.perf_counter()
    for i, prompt in enumerate(batch):
        engine.add(Request(str(i), prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0)))
    stamps: dict[str, list[float]] = {}
    generated, partial = 0, False
    while engine.has_work:
        events = engine.step()
        now = time.perf_counter()
        for event in events:
            if event.token_id is not None:
                generated += 1
                stamps.setdefault(event.request_id, []).append(now)
        if now - start > args.max_seconds:
            partial = True
            engine.abort_all()
            break
    sync(model.device)
    elapsed = time.perf_counter() - start
    first = stamps.get("0", [start])
    decode = (len(first) - 1) / (first[-1] - first[0]) if len(first) > 1 else float("nan")
    ttft = sum(s[0] - start for s in stamps.values()) / max(1, len(stamps))
    prompt_tokens = sum(1 for s in stamps.values()) * args.prompt_len
    del engine
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(output=generated / elapsed, total=(generated + prompt_tokens) / elapsed, decode=decode, ttft=ttft,
                partial=partial, generated=generated, seconds=elapsed)


def warm_up(model: GptOss, args) -> None:
    """Compile every kernel configuration the timed runs use before timing: the attention tiles
    through a short engine run, and the MoE's 16/32/64-row tiles through one layer at 1, 256 and 1024 tokens."""
    run(model, 2, argparse.Namespace(**{**vars(args), "prompt_len": 64, "max_tokens": 4}), seed=99)
    for tokens in (1, 256, 1024):
        model.blocks[0].mlp(torch.randn(tokens, model.config.hidden_size, device=model.device, dtype=model.dtype))
    sync(model.device)


def profile_decode(model: GptOss, args, steps: int = 8) -> None:
    """Where a batch-1 decode step's GPU time goes: the profiler's top kernels over a few eager-launch steps."""
    from torch.profiler import ProfilerActivity, profile

    engine = make_engine(model, 1, argparse.Namespace(**{**vars(args), "graphs": False}))
    engine.add(Request("p", prompts(1, args.prompt_len, model.config.vocab_size, 7)[0], SamplingParams(max_tokens=steps + 2, temperature=0)))
    engine.step()  # the prefill
    sync(model.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync(model.device)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)
    del engine
    if model.device.type == "cuda":
        graph_replay(model, args)


REPLAY_VARIANTS = [  # (label, environment): each a fresh engine and capture, beside the tuned defaults
    ("attention key step 64", {"OSSRUN_ATTN_DECODE_BLOCK_N": "64"}),
    ("attention key step 256", {"OSSRUN_ATTN_DECODE_BLOCK_N": "256"}),
    ("attention keys split in 8", {"OSSRUN_ATTN_DECODE_SPLITS": "8"}),
    ("attention keys split in 16", {"OSSRUN_ATTN_DECODE_SPLITS": "16"}),
    ("MoE GEMV kernels", {"OSSRUN_MOE_DECODE_KIND": "gemv"}),
    ("MoE tensor-core kernels", {"OSSRUN_MOE_DECODE_KIND": "mma"}),
    ("RMSNorm fused into the qkv GEMV", {"OSSRUN_GEMV_FUSE_NORM": "1"}),
    ("programmatic dependent launch", {"OSSRUN_PDL": "1"}),
    ("all of: MoE tensor-core, keys split in 16, fused norm, PDL",
     {"OSSRUN_MOE_DECODE_KIND": "mma", "OSSRUN_ATTN_DECODE_SPLITS": "16", "OSSRUN_GEMV_FUSE_NORM": "1", "OSSRUN_PDL": "1"}),
]


def graph_replay(model: GptOss, args, steps: int = 100) -> None:
    """The batch-1 decode graph replayed back to back: the GPU time of a step without the engine's host work
    (the gap to the req-0 decode rate is what the scheduler, input copies and sampling cost). Also with each of
    `REPLAY_VARIANTS` (decode attention's key step and key splits, the few-token MoE kernels, the norm fused into
    the qkv GEMV, programmatic dependent launch, and all of the new ones together): a fresh capture each."""
    import os

    need = bytes_per_token(model.config, args.prompt_len + 1)
    for label, env in [("tuned defaults", {})] + REPLAY_VARIANTS:
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            engine = make_engine(model, 1, argparse.Namespace(**{**vars(args), "graphs": True}))
            engine.add(Request("g", prompts(1, args.prompt_len, model.config.vocab_size, 8)[0], SamplingParams(max_tokens=4, temperature=0)))
            engine.step()  # the prefill
            engine.step()  # one decode: fills the graph's inputs
            graph = engine.runner.graphs.graphs[1]
            for _ in range(5):
                graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / steps
            print(f"batch-1 graph replay ({label}): {ms:.3f} ms a step → {1000 / ms:.0f} tok/s, "
                  f"{need / ms / 1e9:.2f} TB/s of the bytes a token needs", flush=True)
            del engine
        except Exception as error:  # one variant failing must not cost the others
            print(f"batch-1 graph replay ({label}): failed: {error!r}", flush=True)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="20b", choices=sorted(PRESETS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--paths", nargs="+", default=["kernel", "eager"], choices=sorted(PATHS))
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8, help="the datasheet HBM bandwidth (H200: 4.8)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="cut a run after this long (eager at high N)")
    parser.add_argument("--eager-max-concurrency", type=int, default=64, help="skip eager and kernel-nograph rows above this N")
    parser.add_argument("--step-tokens", type=int, default=8192, help="the engine's token budget per step")
    parser.add_argument("--kv-gib", type=float, default=24.0)
    parser.add_argument("--profile", action="store_true", help="print the top kernels of batch-1 decode steps (kernel path)")
    parser.add_argument("--device", default="cuda", help="cpu only to check this script on a small preset")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = PRESETS[args.preset]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    copy_bw = measured_bandwidth(device)
    start = time.perf_counter()
    weights = random_tensors(config, device, seed=0)
    sync(device)
    print(f"random {args.preset} weights on {device} in {time.perf_counter() - start:.1f} s, "
          f"{sum(t.nbytes for t in weights.values()) / 1e9:.1f} GB", flush=True)
    need = bytes_per_token(config, args.prompt_len + args.max_tokens // 2)
    ceiling = args.bandwidth_tbs * 1e12 / need
    print(f"batch-1 bytes/token {need / 1e9:.2f} GB → ceiling {ceiling:.0f} tok/s at {args.bandwidth_tbs} TB/s "
          f"({copy_bw / need:.0f} tok/s at the measured copy bandwidth {copy_bw / 1e12:.2f} TB/s)", flush=True)

    rows = []
    for path in args.paths:
        precision, graphs = PATHS[path]
        model = GptOss(config, weights, torch.bfloat16, device, precision)
        args.graphs = graphs
        start = time.perf_counter()
        try:
            warm_up(model, args)
        except Exception:
            traceback.print_exc()
            continue
        print(f"{path}: warm-up (compiles) {time.perf_counter() - start:.1f} s", flush=True)
        for n in args.concurrency:
            if path != "kernel" and n > args.eager_max_concurrency:
                continue
            try:
                result = run(model, n, args, seed=n)
            except Exception:  # one broken row must not cost the rest of a GPU session
                traceback.print_exc()
                continue
            rows.append((path, n, result))
            print(f"{path:14s} N={n:4d}: output {result['output']:9.1f} tok/s  total {result['total']:9.1f} tok/s  "
                  f"req-0 decode {result['decode']:7.1f} tok/s  TTFT {result['ttft']:6.2f} s"
                  f"{'  (partial: cut at --max-seconds)' if result['partial'] else ''}", flush=True)
        if path == "kernel" and args.profile:
            try:
                profile_decode(model, args)
            except Exception:
                traceback.print_exc()
        del model
        gc.collect()

    print(f"\n{'path':14s} {'N':>4s} {'output tok/s':>13s} {'total tok/s':>12s} {'req-0 decode':>13s} {'% ceiling':>9s} {'TTFT s':>7s}")
    for path, n, r in rows:
        pct = 100 * r["decode"] / ceiling if n == 1 else float("nan")
        print(f"{path:14s} {n:4d} {r['output']:13.1f} {r['total']:12.1f} {r['decode']:13.1f} {pct:9.1f} {r['ttft']:7.2f}"
              f"{' partial' if r['partial'] else ''}")
    kernel = {n: r for path, n, r in rows if path == "kernel"}
    if 1 in kernel:
        share = kernel[1]["decode"] / ceiling
        print(f"target batch-1 decode ≥ 60% of the ceiling: {100 * share:.1f}% → {'met' if share >= 0.6 else 'not met'}")
    if 256 in kernel:
        r = kernel[256]
        print(f"target 256 concurrent ≥ 10,000 tok/s: output {r['output']:.0f}, total {r['total']:.0f} → "
              f"{'met' if r['output'] >= 10_000 else 'met counting prompt tokens' if r['total'] >= 10_000 else 'not met'}")


if __name__ == "__main__":
    main()
