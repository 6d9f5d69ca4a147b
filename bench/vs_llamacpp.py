"""ossrun against llama.cpp on the same random gpt-oss weights, on the CPU: one markdown table.

    PYTHONPATH=. python bench/vs_llamacpp.py [--preset small|20b] [--model-dir DIR]
        [--rows speed,fidelity,concurrency,depth] [--threads 1,2] [--depths 4096,16384]
        [--concurrency 1,4,16] [--precisions fast] [--layouts q8_0,bf16] [--reps 3]

Needs the `bench` extra (`pip install -e '.[bench]'`: llama-cpp-python builds llama.cpp, minutes). On a CPU that
reports AMX where the VM does not enable it, that native build's AMX kernels fault (a worker dies with -11): build
it without them as bench/CPU_NOTES.md (2026-12-02) shows.
The checkpoint is the project's own (`ossrun make-model`, original layout, MXFP4 experts), written
once to `--model-dir` (default: the preset in ossrun's cache); `gguf_convert.py` writes it next to
that directory as GGUF, experts kept MXFP4, dense weights in Q8_0 (the published layout) and in bf16.

Rows (each engine runs in its own process, so thread counts are clean and a 20b model is loaded only
while its rows run; every figure is the best of `--reps` after a warm-up, unless said otherwise):

- bandwidth: memory read bandwidth at each thread count (sum over 1 GiB), measured in the same run.
- speed: pp64, pp512 (prompt tok/s) and tg32 (generated tok/s after the pp64 prompt) per thread
  count, with each decode figure as a share of its bandwidth ceiling: bandwidth / bytes read per token
  (the engine's own weights: routed experts, attention, router, unembedding; plus the KV it reads).
  Cost: small ~1 min; 20b ~25 min (each engine loads 20b once per thread count, pp512 dominates).
- fidelity: mean KL(exact ‖ engine) and top-1 agreement of next-token distributions over
  2 × 192 positions, against ossrun's exact path (float32). Cost: small ~1 min; 20b ~15 min
  (the float32 model is ~7 GB besides the mapped experts).
- concurrency: generated tok/s with 1, 4 and 16 requests of 64 prompt + 32 generated tokens,
  ossrun's `Engine` (continuous batching) against llama.cpp's parallel sequences, prefill included,
  at the highest thread count. Cost: small ~1 min; 20b ~30 min.
- depth: tg32 and then pp512 after 4k and 16k tokens of context, once each (the depth prefill is
  not timed and dominates). Cost: small ~3 min; 20b: at ~10 tok/s prefill, 16k takes ~30 min per
  engine and 4k ~7 min: ~2 h for three engines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
ROWS = ("speed", "fidelity", "concurrency", "depth")
LAYOUTS = ("q8_0", "bf16")
FIDELITY_PROMPTS = [(192, 11), (192, 12)]  # (length, seed): past the 128-token sliding window


# -- workers: one engine, one thread count, in a fresh process ----------------------------------

def run_worker(job: dict, threads: int) -> dict:
    """Run `job` in a child process with `threads` threads (torch, OpenMP and llama.cpp alike) → its result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps({**job, "threads": threads})],
                         env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {job} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    label = job.get("precision") or Path(job.get("gguf", "")).stem or ""
    print(f"[{time.strftime('%H:%M:%S')}] {job['task']} {job.get('engine', '')} {label} {threads} thread(s): "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)  # progress of a long run
    return json.loads(lines[-1][len("RESULT "):])


def worker(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    task, threads = job["task"], job["threads"]
    if task == "bandwidth":
        from workload import read_bandwidth

        return {"bytes_per_s": read_bandwidth(threads)}
    if job["engine"] == "llamacpp":
        import llamacpp_side as side

        target, extra = job["gguf"], (threads,)
    else:
        import ossrun_side as side

        target, extra = side.load(job["model"], job["precision"]), ()
    if task == "speed":
        return side.speed(target, *extra, job["reps"]) | {"weight_bytes": _weight_bytes(job, target)}
    if task == "concurrency":
        return {str(n): side.concurrency(target, *extra, n) for n in job["concurrency"]}
    if task == "depth":
        return {str(d): side.depth(target, *extra, d) for d in job["depths"]}
    if task == "logits":
        from workload import prompt

        np.save(job["out"], side.logits(target, *extra, [prompt(n, seed) for n, seed in FIDELITY_PROMPTS]))
        return {}
    raise ValueError(f"unknown task {task}")


def _weight_bytes(job: dict, target) -> float:
    if job["engine"] == "llamacpp":
        import llamacpp_side

        return llamacpp_side.weight_bytes_per_token(job["gguf"], job["experts_used"], job["num_experts"])
    import ossrun_side

    return ossrun_side.weight_bytes_per_token(target)


# -- the parent: engines, rows, the table -------------------------------------------------------

def engines(args: argparse.Namespace, model_dir: Path, ggufs: dict[str, Path], config) -> dict[str, dict]:
    """Engine name → its worker job (without task and threads)."""
    out = {f"ossrun {p}": {"engine": "ossrun", "model": str(model_dir), "precision": p} for p in args.precisions}
    for layout in args.layouts:
        out[f"llama.cpp {layout}"] = {"engine": "llamacpp", "gguf": str(ggufs[layout]),
                                      "experts_used": config.experts_per_token, "num_experts": config.num_experts}
    return out


class Table:
    """Rows of figures per engine; ratios of the first ossrun engine to each llama.cpp layout."""

    def __init__(self, names: list[str]):
        self.names = names
        self.ours = names[0]
        self.peers = [n for n in names if n.startswith("llama.cpp")]
        self.lines: list[str] = []
        header = ["row", "threads", *names, *[f"{self.ours} / {p}" for p in self.peers]]
        self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def add(self, row: str, threads: int | str, values: dict[str, float], fmt: str = "{:.2f}", ratios: bool = True) -> None:
        cells = [fmt.format(values[n]) if n in values else "" for n in self.names]
        if ratios and self.ours in values:
            cells += [f"{values[self.ours] / values[p]:.2f}×" if values.get(p) else "" for p in self.peers]
        else:
            cells += [""] * len(self.peers)
        self.lines.append("| " + " | ".join([row, str(threads), *cells]) + " |")

    def note(self, text: str) -> None:
        self.lines.append("| " + text + " |" + " |" * (1 + len(self.names) + len(self.peers)))

    def __str__(self) -> str:
        return "\n".join(self.lines)


def speed_rows(table: Table, jobs: dict[str, dict], args, config) -> None:
    from workload import kv_bytes_per_token

    for threads in args.threads:
        bandwidth = run_worker({"task": "bandwidth"}, threads)["bytes_per_s"]
        table.note(f"memory read bandwidth, {threads} thread(s): {bandwidth / 1e9:.1f} GB/s")
        results = {name: run_worker(job | {"task": "speed", "reps": args.reps}, threads) for name, job in jobs.items()}
        for row in ("pp64", "pp512", "tg32"):
            table.add(row + " tok/s", threads, {name: r[row] for name, r in results.items()})
        # tg32 runs at 64..96 tokens of context; KV entries are 2 bytes (f16 in llama.cpp, bf16 in ossrun fast).
        kv = kv_bytes_per_token(config.num_hidden_layers, config.is_sliding, config.sliding_window, config.kv_size, 80, 2)
        ceilings = {name: bandwidth / (r["weight_bytes"] + kv) for name, r in results.items()}
        table.add("tg32 ceiling tok/s", threads, ceilings, ratios=False)
        table.add("tg32 share of ceiling", threads, {n: results[n]["tg32"] / ceilings[n] for n in results}, fmt="{:.0%}", ratios=False)
        table.add("weights read per token GB", threads, {n: r["weight_bytes"] / 1e9 for n, r in results.items()}, fmt="{:.3f}", ratios=False)


def fidelity_rows(table: Table, jobs: dict[str, dict], args, model_dir: Path) -> None:
    threads = max(args.threads)
    with tempfile.TemporaryDirectory(prefix="vs-llamacpp-") as tmp:
        reference = Path(tmp) / "exact.npy"
        run_worker({"engine": "ossrun", "model": str(model_dir), "precision": "exact", "task": "logits", "out": str(reference)}, threads)
        kl, top1 = {}, {}
        for name, job in jobs.items():
            out = Path(tmp) / f"{len(kl)}.npy"
            run_worker(job | {"task": "logits", "out": str(out)}, threads)
            kl[name], top1[name] = divergence(np.load(reference), np.load(out))
            out.unlink()
    positions = sum(n for n, _ in FIDELITY_PROMPTS)
    table.add(f"mean KL vs exact ({positions} positions)", threads, kl, fmt="{:.2e}", ratios=False)
    table.add("top-1 agreement with exact", threads, top1, fmt="{:.1%}", ratios=False)


def divergence(reference: np.ndarray, other: np.ndarray, rows: int = 32) -> tuple[float, float]:
    """(mean KL(p_ref ‖ p_other), share of positions whose argmax agrees), from logits [T, V];
    float64, `rows` positions at a time (a 201k vocabulary makes whole-array temporaries GBs)."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    kl = []
    for begin in range(0, len(reference), rows):
        lp, lq = log_softmax(reference[begin:begin + rows]), log_softmax(other[begin:begin + rows])
        kl.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
    return float(np.concatenate(kl).mean()), float((reference.argmax(-1) == other.argmax(-1)).mean())


def concurrency_rows(table: Table, jobs: dict[str, dict], args) -> None:
    threads = max(args.threads)
    results = {name: run_worker(job | {"task": "concurrency", "concurrency": args.concurrency}, threads) for name, job in jobs.items()}
    for n in args.concurrency:
        table.add(f"{n} concurrent, generated tok/s", threads, {name: r[str(n)] for name, r in results.items()})


def depth_rows(table: Table, jobs: dict[str, dict], args) -> None:
    threads = max(args.threads)
    results = {name: run_worker(job | {"task": "depth", "depths": args.depths}, threads) for name, job in jobs.items()}
    for d in args.depths:
        for row in ("pp512", "tg32"):
            table.add(f"{row} tok/s @ depth {d}", threads, {name: r[str(d)][row] for name, r in results.items()})


def prepare(args: argparse.Namespace):
    """The checkpoint (written once) and its two GGUFs (converted once, in a child process)."""
    from ossrun.model.checkpoint import read_config, write_random_checkpoint
    from ossrun.model.config import PRESETS
    from ossrun.model.resolve import preset_dir

    import gguf_convert

    if args.model_dir is None:
        model_dir = preset_dir(args.preset)
    else:
        model_dir = Path(args.model_dir)
        if not (model_dir / "config.json").exists():
            partial = model_dir.with_name(model_dir.name + ".partial")
            write_random_checkpoint(PRESETS[args.preset], partial, "original", seed=0)
            partial.rename(model_dir)
    ggufs = {layout: gguf_convert.gguf_path(model_dir, layout) for layout in args.layouts}
    missing = [layout for layout, path in ggufs.items() if not path.exists()]
    if missing:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")]))
        subprocess.run([sys.executable, str(BENCH / "gguf_convert.py"), "--model", str(model_dir), "--dense", *missing], env=env, check=True)
    return model_dir, ggufs, read_config(model_dir)


def parse_args() -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    def names(allowed):
        def parse(text: str) -> list[str]:
            items = [x for x in text.split(",") if x]
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
            return items
        return parse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "20b"])
    parser.add_argument("--model-dir", default=None, help="checkpoint directory (written there if missing); GGUFs go next to it")
    parser.add_argument("--rows", type=names(ROWS), default=list(ROWS))
    parser.add_argument("--threads", type=ints, default=[1, 2])
    parser.add_argument("--depths", type=ints, default=[4096, 16384])
    parser.add_argument("--concurrency", type=ints, default=[1, 4, 16])
    parser.add_argument("--precisions", type=names(("fast", "exact")), default=["fast"], help="ossrun precisions to run (the first one gets the ratios)")
    parser.add_argument("--layouts", type=names(LAYOUTS), default=list(LAYOUTS), help="llama.cpp GGUF layouts to run (q8_0 alone halves the long depth rows)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    start = time.perf_counter()
    model_dir, ggufs, config = prepare(args)
    jobs = engines(args, model_dir, ggufs, config)
    table = Table(list(jobs))
    timings = []
    for row, fill in (("speed", lambda: speed_rows(table, jobs, args, config)), ("fidelity", lambda: fidelity_rows(table, jobs, args, model_dir)),
                      ("concurrency", lambda: concurrency_rows(table, jobs, args)), ("depth", lambda: depth_rows(table, jobs, args))):
        if row in args.rows:
            row_start = time.perf_counter()
            fill()
            timings.append(f"{row} {time.perf_counter() - row_start:.0f} s")
    print(f"\n{args.preset} preset ({model_dir}), same weights for every engine; "
          f"llama.cpp: llama-cpp-python {_llama_version()}, defaults (flash attention auto, f16 KV), n_ubatch 512\n")
    print(table)
    print(f"\nrow times: {', '.join(timings)}; total {time.perf_counter() - start:.0f} s")


def _llama_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
