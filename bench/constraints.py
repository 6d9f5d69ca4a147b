"""Structured output: llguidance vs xgrammar on o200k_harmony, then the engine's tokens/s with and without constraints.

    python bench/constraints.py [--libs llguidance xgrammar] [--concurrency 1 16] [--max-tokens 200] [--repeats 3] [--threads N] [--skip-engine]

Part 1 measures each grammar library in a fresh process (so its memory is its own): building its
tokenizer from our 201,088-token vocabulary, compiling JSON schemas (caches off) and the harmony
tool-call wrapper, the per-token mask time while replaying a valid completion token by token, the
memory it holds, and whether a harmony special token can slip into free reasoning text. xgrammar is
optional (`pip install xgrammar`, which pulls triton); it is measured only when importable.

Part 2 runs the tiny random model on the engine: N concurrent requests with a `json_schema`
constraint (reasoning capped at 16 tokens), and the same N requests free, each generating exactly as
many tokens as its constrained twin; it reports generated tokens/s (best of alternating repeats: the
machine may be shared), the mask computation per token (on the grammar pool, overlapped with the
forward) and what the engine thread actually waited for it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLAT = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"}},
        "required": ["name", "age"]}
NESTED = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "customer": {"type": "object", "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"},
                                                      "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                                                                  "required": ["city"]}},
                     "required": ["name", "address"]},
        "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                                                                              "price": {"type": "number"}}, "required": ["sku", "qty"]}},
    },
    "required": ["order_id", "status", "customer", "lines"],
}
LARGE = {"type": "object", "properties": {f"field_{i}": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"},
                                                         {"enum": ["x", "y", "z"]}, {"type": "array", "items": {"type": "number"}}][i % 5]
                                          for i in range(60)}, "required": [f"field_{i}" for i in range(0, 60, 2)]}
INSTANCES = {
    "flat": (FLAT, {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com"}),
    "nested": (NESTED, {"order_id": "A-1001", "status": "shipped", "customer": {"name": "Bo", "vip": True, "address": {"city": "Oslo", "zip": "0150"}},
                        "lines": [{"sku": "KB-1", "qty": 2, "price": 19.5}, {"sku": "MS-7", "qty": 1}]}),
    "large": (LARGE, {f"field_{i}": ["text", 7, False, "y", [1.5, 2]][i % 5] for i in range(60)}),
}
REASONING = "The user wants the weather in Oslo, so I call get_weather with the city and the unit. " * 3


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"mean_us": statistics.mean(ordered) * 1e6, "p50_us": ordered[len(ordered) // 2] * 1e6,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6, "max_us": ordered[-1] * 1e6}


# -- part 1: one library, in its own process ---------------------------------------------------------

def measure_llguidance() -> dict:
    import llguidance
    import torch

    from ossrun.engine.constraints import ConstraintCompiler
    from ossrun.harmony import END, VOCAB_SIZE, encode
    from ossrun.harmony import grammar as harmony_grammar
    from ossrun.harmony.grammar import llguidance_tokenizer as build_tokenizer

    base = _rss_mb()
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    result = {"tokenizer_s": time.perf_counter() - start}
    words = (VOCAB_SIZE + 31) // 32
    bits = torch.zeros(words, dtype=torch.int32)

    def replay(matcher, tokens):
        times = []
        for token in tokens:
            t0 = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(bits.data_ptr(), words * 4)
            times.append(time.perf_counter() - t0)
            assert (int(bits[token // 32]) >> (token % 32)) & 1, f"llguidance refused token {token}"
            assert matcher.consume_token(token), matcher.get_error()
        return times

    json_times = []
    for name, (schema, instance) in INSTANCES.items():
        t0 = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(schema), log_level=0)
        result[f"compile_{name}_ms"] = (time.perf_counter() - t0) * 1e3
        json_times += replay(matcher, encode(json.dumps(instance)))
    result["mask_json"] = _stats(json_times)

    # The harmony wrapper as the engine builds it (reasoning, then a forced tool call); its matcher is
    # driven directly, so the time is the library's alone, as for xgrammar.
    compiler = ConstraintCompiler(tokenizer, workers=1)
    t0 = time.perf_counter()
    constraint = compiler.compile(harmony_grammar.tool_call("get_weather", NESTED))
    result["compile_harmony_ms"] = (time.perf_counter() - t0) * 1e3
    constraint.allowed_tokens()  # the first mask, computed on the pool, is done
    matcher = constraint._matcher
    text = (f"<|channel|>analysis<|message|>{REASONING}<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
            f"<|constrain|>json<|message|>{json.dumps(INSTANCES['nested'][1])}<|call|>")
    tokens = encode(text, allow_special=True)
    in_reasoning = tokens.index(200008) + 2
    times = replay(matcher, tokens[:in_reasoning])
    matcher.unsafe_compute_mask_ptr(bits.data_ptr(), words * 4)
    allowed = [t for t in range(199998, VOCAB_SIZE) if (int(bits[t // 32]) >> (t % 32)) & 1 and t != END]
    result["specials_in_reasoning"] = len(allowed)
    times += replay(matcher, tokens[in_reasoning:])
    result["mask_harmony"] = _stats(times)
    result["rss_mb"] = _rss_mb() - base
    return result


def measure_xgrammar() -> dict:
    import torch
    import xgrammar as xgr

    from ossrun.harmony import END, ENDOFTEXT, VOCAB_SIZE, encode, token_bytes

    base = _rss_mb()
    start = time.perf_counter()
    vocab = [token_bytes(t) for t in range(VOCAB_SIZE)]
    # Stop token: <|endoftext|>, never in a completion; <|return|>/<|call|> must stay matchable as the
    # grammar's own end strings (as stop tokens xgrammar would refuse them there).
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=VOCAB_SIZE, stop_token_ids=[ENDOFTEXT])
    result = {"tokenizer_s": time.perf_counter() - start}
    compiler = xgr.GrammarCompiler(info, max_threads=8, cache_enabled=False)
    bits = xgr.allocate_token_bitmask(1, VOCAB_SIZE)

    def replay(matcher, tokens):
        times = []
        for token in tokens:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bits)
            times.append(time.perf_counter() - t0)
            assert (int(bits[0, token // 32]) >> (token % 32)) & 1, f"xgrammar refused token {token}"
            assert matcher.accept_token(token)
        return times

    json_times = []
    for name, (schema, instance) in INSTANCES.items():
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(schema)
        result[f"compile_{name}_ms"] = (time.perf_counter() - t0) * 1e3
        json_times += replay(xgr.GrammarMatcher(compiled), encode(json.dumps(instance)))
    result["mask_json"] = _stats(json_times)

    tag = xgr.get_model_structural_tag("harmony", tools=[{"type": "function", "function": {"name": "get_weather", "parameters": NESTED}}],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    t0 = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(tag))
    result["compile_harmony_ms"] = (time.perf_counter() - t0) * 1e3
    # xgrammar's harmony tag spells the call header without the space before <|constrain|>.
    text = (f"<|channel|>analysis<|message|>{REASONING}<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather"
            f"<|constrain|>json<|message|>{json.dumps(INSTANCES['nested'][1])}<|call|>")
    tokens = encode(text, allow_special=True)
    in_reasoning = tokens.index(200008) + 2
    times = replay(matcher, tokens[:in_reasoning])
    matcher.fill_next_token_bitmask(bits)
    allowed = [t for t in range(199998, VOCAB_SIZE) if (int(bits[0, t // 32]) >> (t % 32)) & 1 and t != END]
    result["specials_in_reasoning"] = len(allowed)
    times += replay(matcher, tokens[in_reasoning:])
    result["mask_harmony"] = _stats(times)
    result["rss_mb"] = _rss_mb() - base
    del torch
    return result


def compare_libraries(libs: list[str]) -> Table:
    table = Table(title="Grammar libraries on o200k_harmony (201,088 tokens), CPU, each in a fresh process")
    table.add_column("measure")
    results = {}
    for lib in libs:
        proc = subprocess.run([sys.executable, __file__, "--measure", lib], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            Console(stderr=True).print(f"[yellow]{lib}: not measured ({last})")
            continue
        results[lib] = json.loads(proc.stdout.strip().splitlines()[-1])
        table.add_column(lib, justify="right")
    rows = [("tokenizer from the vocabulary (s)", "tokenizer_s", "{:.2f}")]
    rows += [(f"compile JSON schema '{n}' (ms)", f"compile_{n}_ms", "{:.1f}") for n in INSTANCES]
    rows += [("compile harmony tool-call grammar (ms)", "compile_harmony_ms", "{:.1f}")]
    for key, label in (("mask_json", "JSON"), ("mask_harmony", "harmony call")):
        for stat in ("mean_us", "p50_us", "p99_us", "max_us"):
            rows.append((f"mask per token, {label}, {stat[:-3]} (µs)", (key, stat), "{:.0f}"))
    rows += [("special tokens allowed inside reasoning text", "specials_in_reasoning", "{}"),
             ("memory held: tokenizer + grammars (MB RSS)", "rss_mb", "{:.0f}")]
    for label, key, fmt in rows:
        cells = []
        for lib in results:
            value = results[lib][key[0]][key[1]] if isinstance(key, tuple) else results[lib][key]
            cells.append(fmt.format(value))
        table.add_row(label, *cells)
    return table


# -- part 2: the engine with and without constraints ---------------------------------------------------

def engine_throughput(concurrency: list[int], max_tokens: int, repeats: int) -> Table:
    import torch

    from ossrun.engine import constraints as constraints_module
    from ossrun.engine.constraints import ConstraintCompiler
    from ossrun.engine.engine import Engine, EngineOptions
    from ossrun.engine.request import Request, SamplingParams
    from ossrun.harmony import STOP_TOKENS, parse_completion, render_request
    from ossrun.harmony import grammar as harmony_grammar
    from ossrun.harmony.grammar import llguidance_tokenizer
    from ossrun.model.checkpoint import load_checkpoint
    from ossrun.model.gpt_oss import GptOss
    from ossrun.model.resolve import preset_dir

    model = GptOss.from_checkpoint(load_checkpoint(preset_dir("tiny", layout="hf")), torch.float32)
    compiler = ConstraintCompiler(llguidance_tokenizer())
    timings = {"compute": [], "wait": []}
    compute, allowed = constraints_module.Constraint._compute, constraints_module.Constraint.allowed_tokens

    def timed_compute(self):
        t0 = time.perf_counter()
        try:
            return compute(self)
        finally:
            timings["compute"].append(time.perf_counter() - t0)

    def timed_allowed(self):
        t0 = time.perf_counter()
        try:
            return allowed(self)
        finally:
            timings["wait"].append(time.perf_counter() - t0)

    constraints_module.Constraint._compute = timed_compute
    constraints_module.Constraint.allowed_tokens = timed_allowed
    # Bounded strings and numbers: the random model would never close an unbounded string.
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "tags", "size", "meta"], "properties": {
        "name": {"type": "string", "maxLength": 16}, "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["a", "b", "c"]}},
        "size": {"type": "integer", "minimum": 0, "maximum": 999},
        "meta": {"type": "object", "additionalProperties": False, "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}}}
    prompt = render_request({"messages": [{"role": "user", "content": "Describe the item as JSON."}]}).token_ids

    def run(n: int, lengths: list[int] | None) -> tuple[float, list[int], int]:
        """lengths None: constrained requests; else free requests of exactly those lengths → (tok/s, lengths, valid)."""
        engine = Engine(model, EngineOptions(kv_dtype=torch.float32, max_num_seqs=max(16, n), max_tokens_per_step=2048,
                                             kv_cache_bytes=256 * 1024**2, max_model_len=4096, prefix_caching=False))
        if not hasattr(Engine, "_advance_constraint"):  # until the engine feeds its constraints itself
            postprocess = engine._postprocess

            def feeding(seq, output, i):
                if seq.error is None and seq.request.constraint is not None:
                    seq.request.constraint.advance(output.token_ids[i])
                return postprocess(seq, output, i)

            engine._postprocess = feeding
        requests = []
        for i in range(n):
            if lengths is None:
                params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i + 1, stop_token_ids=STOP_TOKENS)
                requests.append(Request(str(i), prompt, params, constraint=compiler.compile(harmony_grammar.json_final(schema, reasoning_budget=16))))
            else:
                requests.append(Request(str(i), prompt, SamplingParams(max_tokens=lengths[i], temperature=1.0, seed=i + 1)))
        start = time.perf_counter()
        results = engine.generate(requests)
        elapsed = time.perf_counter() - start
        tokens = [[e.token_id for e in results[str(i)] if e.token_id is not None] for i in range(n)]
        valid = sum(_valid(parse_completion(t).content) for t in tokens)
        return sum(map(len, tokens)) / elapsed, [len(t) for t in tokens], valid

    table = Table(title=f"Engine on the tiny random model (CPU, {torch.get_num_threads()} threads); free requests generate "
                        f"as many tokens as their constrained twins; best of {repeats} alternating runs")
    for column in ("concurrent", "constraint", "tok/s", "tokens", "valid JSON", "mask compute µs/token", "engine waited µs/token", "vs free"):
        table.add_column(column, justify="right")
    per = lambda xs: f"{sum(xs) / max(1, len(xs)) * 1e6:.0f}"  # noqa: E731
    for n in concurrency:
        run(n, None)  # warm-up: first-call costs, compiled grammar cached like a repeated schema
        best_free, best_constrained = 0.0, (0.0, [], 0, "", "")
        for _ in range(repeats):
            timings["compute"].clear()
            timings["wait"].clear()
            tps, lengths, valid = run(n, None)
            if tps > best_constrained[0]:
                best_constrained = (tps, lengths, valid, per(timings["compute"]), per(timings["wait"]))
            best_free = max(best_free, run(n, lengths)[0])
        tps, lengths, valid, compute_us, wait_us = best_constrained
        table.add_row(str(n), "none", f"{best_free:.0f}", str(sum(lengths)), "–", "–", "–", "1.00x")
        table.add_row(str(n), "json_schema", f"{tps:.0f}", str(sum(lengths)), f"{valid}/{n}", compute_us, wait_us, f"{tps / best_free:.2f}x")
    compiler.close()
    return table


def _valid(content: str) -> bool:
    try:
        json.loads(content)
        return True
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--libs", nargs="*", default=["llguidance", "xgrammar"], help="none: skip the comparison")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps({"llguidance": measure_llguidance, "xgrammar": measure_xgrammar}[args.measure]()))
        return
    console = Console()
    if args.libs:
        console.print(compare_libraries(args.libs))
        console.print("Choice: llguidance — compiles schemas 20-40x faster (they arrive per request), keeps special tokens out of "
                      "free text, expresses the harmony wrapper with inline JSON Schema in one Lark grammar, and has no "
                      "dependencies; its slower masks are computed while the model runs.")
    if not args.skip_engine:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        console.print(engine_throughput(args.concurrency, args.max_tokens, args.repeats))


if __name__ == "__main__":
    main()
