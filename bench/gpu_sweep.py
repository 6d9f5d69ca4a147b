"""Batch-1 kernels on the GPU, tile by tile, on 20b shapes; writes the fastest choices as environment settings.

    PYTHONPATH=. python bench/gpu_sweep.py [--env-out tuned.env]

Times (median of triton.testing.do_bench, weights rotated over several copies so that L2, 60 MB,
does not hold them between calls):
1. the decode MoE kernels (`triton_moe_decode`) per tile: mlp1 (4 experts × 5760 rows) and mlp2
   (4 × 2880 rows) at one token, against the bytes they must read;
2. the PTX nibble decode against the integer one at the best tiles, and the norm + router kernel's tile;
3. the swap-AB tensor-core kernels (`triton_moe_mma`) per tile at one token, each checked against the GEMV
   kernels' output first (a wrong result, e.g. a GPU that flushes the bf16 subnormals the decode passes
   through, rules the kind out);
4. a whole MoE layer (norm, routing, both projections, residual) at 1–16 tokens, GEMV and tensor-core
   few-token kernels against the grouped tl.dot kernel: which few-token kind, and up to how many tokens;
5. the dense GEMVs (qkv, out, unembedding) at 1, 2 and 4 rows, cuBLAS (`F.linear`) against the Triton GEMV per tile;
6. batch-1 decode attention at 576, 4k and 16k keys, one pass against keys split in 8 or 16.
The choices go to --env-out as `export` lines, which bench/gpu_session.sh sources before bench/gpu.py.
"""

from __future__ import annotations

import argparse
import os
import traceback

import torch
import torch.nn.functional as F
import triton.testing

from ossrun.model import mxfp4
from ossrun.model.gpt_oss import RMSNorm
from ossrun.model.kernels import triton_gemv, triton_moe, triton_moe_decode, triton_moe_mma

H, I, E, K_ROUTE = 2880, 2880, 32, 4  # 20b
COPIES = 4  # layers' worth of expert weights: 4 × 400 MB


def bench(fn, copies: int) -> float:
    """Median µs of one call, `fn(i)` cycling over the weight copies."""
    state = {"i": 0}

    def step():
        fn(state["i"] % copies)
        state["i"] += 1
    return 1000 * triton.testing.do_bench(step, warmup=25, rep=150, return_mode="median")


def expert_weights(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed bytes, scales near 2^-5..2^0 (real checkpoints' range), bf16 biases: no CPU quantisation."""
    blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8, device="cuda")
    scales = torch.randint(118, 124, (E, rows, cols // 32), dtype=torch.uint8, device="cuda")
    return blocks, scales, torch.randn(E, rows, device="cuda", dtype=torch.bfloat16)


def routed(tokens: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(E, generator=g)[:K_ROUTE] for _ in range(tokens)]).to(torch.int32).cuda()


BYTES1 = K_ROUTE * 2 * I * (H // 2 + H // 32)  # what the first projection reads at one token (4 experts' rows and scales)
BYTES2 = K_ROUTE * H * (I // 2 + I // 32)  # and the second


def one_token() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch-1 MoE step's operands: t [1, H], its 4 experts [1, 4], routing weights [1, 4] and h [4, I]."""
    t = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    experts = routed(1, torch.Generator().manual_seed(0))
    weights = torch.full((1, K_ROUTE), 0.25, device="cuda", dtype=torch.bfloat16)
    return t, experts, weights, torch.randn(K_ROUTE, I, device="cuda", dtype=torch.bfloat16)


def sweep_decode_tiles(layers, env: dict) -> None:
    t, experts, weights, h = one_token()
    bytes1, bytes2 = BYTES1, BYTES2
    best: dict[str, tuple[float, tuple]] = {}
    print(f"decode MoE tiles at 1 token (mlp1 reads {bytes1 / 1e6:.1f} MB, mlp2 {bytes2 / 1e6:.1f} MB):", flush=True)
    for i in range(max(len(triton_moe_decode.SWEEP_TILES_MLP1), len(triton_moe_decode.SWEEP_TILES_MLP2))):
        pick = lambda tiles: tiles[min(i, len(tiles) - 1)]  # noqa: E731
        text1, text2 = ",".join(map(str, pick(triton_moe_decode.SWEEP_TILES_MLP1))), ",".join(map(str, pick(triton_moe_decode.SWEEP_TILES_MLP2)))
        os.environ["OSSRUN_MOE_DECODE_TILES"] = f"{text1};{text2}"
        us1 = bench(lambda i: triton_moe_decode.mlp1(t, experts, *layers[i][0], 7.0), COPIES)
        us2 = bench(lambda i: triton_moe_decode.mlp2(h, experts, weights, *layers[i][1], residual=t), COPIES)
        print(f"  mlp1 {text1:8s} {us1:7.1f} us ({bytes1 / us1 / 1e3:5.0f} GB/s)   mlp2 {text2:8s} {us2:7.1f} us ({bytes2 / us2 / 1e3:5.0f} GB/s)",
              flush=True)
        for name, us, tile in (("mlp1", us1, text1), ("mlp2", us2, text2)):
            if name not in best or us < best[name][0]:
                best[name] = (us, tile)
    tiles = ";".join(best[name][1] for name in ("mlp1", "mlp2"))
    os.environ["OSSRUN_MOE_DECODE_TILES"] = env["OSSRUN_MOE_DECODE_TILES"] = tiles
    print(f"  best: {tiles} → {best['mlp1'][0] + best['mlp2'][0]:.1f} us a layer's projections "
          f"({(bytes1 + bytes2) / (best['mlp1'][0] + best['mlp2'][0]) / 1e3:.0f} GB/s)", flush=True)
    both = {}
    for asm in ("1", "0"):
        os.environ["OSSRUN_MOE_ASM"] = asm
        both[asm] = bench(lambda i: triton_moe_decode.mlp1(t, experts, *layers[i][0], 7.0), COPIES) + \
            bench(lambda i: triton_moe_decode.mlp2(h, experts, weights, *layers[i][1], residual=t), COPIES)
        print(f"  PTX nibble decode {'on ' if asm == '1' else 'off'}: {both[asm]:7.1f} us", flush=True)
    os.environ["OSSRUN_MOE_ASM"] = env["OSSRUN_MOE_ASM"] = "1" if both["1"] <= both["0"] else "0"


def deinterleave(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a[:, 0::2], a[:, 1::2]], 1).contiguous()


def mma_agrees(layers) -> bool:
    """Whether the tensor-core kernels reproduce the GEMV kernels at 1 and 3 tokens (both round h and y to bf16:
    a few bf16 steps apart at most), and read every weight back exactly (identity activations, scales 2..240)."""
    g = torch.Generator().manual_seed(1)
    agree = True
    for tokens in (1, 3):
        t = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
        experts, weights = routed(tokens, g), torch.full((tokens, K_ROUTE), 0.25, device="cuda", dtype=torch.bfloat16)
        h_gemv = triton_moe_decode.mlp1(t, experts, *layers[0][0], 7.0)
        y_gemv = triton_moe_decode.mlp2(h_gemv, experts, weights, *layers[0][1], residual=x)
        for small in (False, True):  # the sweep's scale bytes are 118..123: both decodes apply
            h_mma = triton_moe_mma.mlp1(deinterleave(t), experts, *layers[0][0], 7.0, small_scales=small)
            y_mma = triton_moe_mma.mlp2(deinterleave(h_gemv), experts, weights, *layers[0][1], residual=x, small_scales=small)
            err_h = float((deinterleave(h_gemv).float() - h_mma.float()).abs().max() / h_gemv.float().abs().max())
            err_y = float((y_gemv.float() - y_mma.float()).abs().max() / (y_gemv.float() - x.float()).abs().max())
            print(f"  tensor-core ({'one' if small else 'two'}-multiply decode) vs GEMV kernels at {tokens} token(s): "
                  f"h {err_h:.1e}, y {err_y:.1e} (max relative)", flush=True)
            agree &= err_h < 2e-2 and err_y < 2e-2
    blocks = torch.arange(256, dtype=torch.uint8, device="cuda").view(1, 16, 1, 16)
    eye = deinterleave(torch.eye(32, device="cuda"))
    exact = True
    for scale_bytes, small in (([2, 3, 100, 127, 128, 140, 200, 127, 126, 5, 60, 127, 127, 150, 90, 240], False),
                               ([2, 3, 100, 127, 128, 120, 4, 127, 126, 5, 60, 127, 127, 110, 90, 2], True)):
        scales = torch.tensor(scale_bytes, dtype=torch.uint8, device="cuda").view(1, 16, 1)
        y = triton_moe_mma.mlp2(eye, torch.zeros(32, 1, dtype=torch.int32, device="cuda"), torch.ones(32, 1, device="cuda"), blocks,
                                scales, None, residual=torch.zeros(32, 16, device="cuda"), small_scales=small)
        ok = bool(torch.equal(y.cpu(), mxfp4.dequantize(blocks[0].cpu(), scales[0].cpu(), torch.float32).T))
        print(f"  tensor-core {'one' if small else 'two'}-multiply decode of every nibble at extreme scales: "
              f"{'exact' if ok else 'WRONG'}", flush=True)
        exact &= ok
    return agree and exact


def sweep_router(env: dict) -> None:
    """The norm + router logits + top-k launches at one token, per (experts a program, warps)."""
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    scale = torch.ones(H, device="cuda")
    gate = torch.randn(E, H, device="cuda", dtype=torch.bfloat16) / 50, torch.randn(E, device="cuda", dtype=torch.bfloat16)
    times = {}
    for block_e, warps in triton_moe_decode.SWEEP_ROUTER_TILES:
        os.environ["OSSRUN_MOE_ROUTER_TILE"] = text = f"{block_e},{warps}"
        times[text] = bench(lambda i: triton_moe_decode.norm_route(x, scale, 1e-5, *gate, K_ROUTE), 1)
    print("norm + router + top-k at 1 token, µs by (experts a program, warps): "
          + "   ".join(f"{text} {us:5.1f}" for text, us in times.items()), flush=True)
    os.environ["OSSRUN_MOE_ROUTER_TILE"] = env["OSSRUN_MOE_ROUTER_TILE"] = min(times, key=times.get)


def sweep_mma_tiles(layers, env: dict) -> bool:
    """The tensor-core kernels per tile at one token; → whether they may be chosen at all (`mma_agrees`)."""
    print("tensor-core (swap-AB) few-token MoE kernels:", flush=True)
    if not mma_agrees(layers):
        print("  ruled out: their results differ from the GEMV kernels'", flush=True)
        return False
    x, experts, weights, h = one_token()
    t = deinterleave(x)  # the residual x doubles as the normed input: only the bytes and the arithmetic matter here
    bytes1, bytes2 = BYTES1, BYTES2
    best: tuple[float, str] | None = None
    for tile in triton_moe_mma.SWEEP_TILES:
        text = ",".join(map(str, tile))
        os.environ["OSSRUN_MOE_MMA_TILE"] = text
        us1 = bench(lambda i: triton_moe_mma.mlp1(t, experts, *layers[i][0], 7.0), COPIES)
        us2 = bench(lambda i: triton_moe_mma.mlp2(h, experts, weights, *layers[i][1], residual=x), COPIES)
        print(f"  {text:10s} mlp1 {us1:7.1f} us ({bytes1 / us1 / 1e3:5.0f} GB/s)   mlp2 + slot sum {us2:7.1f} us "
              f"({bytes2 / us2 / 1e3:5.0f} GB/s)   {us1 + us2:7.1f} us", flush=True)
        if best is None or us1 + us2 < best[0]:
            best = (us1 + us2, text)
    assert best is not None
    os.environ["OSSRUN_MOE_MMA_TILE"] = env["OSSRUN_MOE_MMA_TILE"] = best[1]
    print(f"  best: {best[1]} → {best[0]:.1f} us a layer's projections ({(bytes1 + bytes2) / best[0] / 1e3:.0f} GB/s)", flush=True)
    split_us = {}
    for split_k in ("1", "2", "4"):  # the second projection's K runs (more programs, more bytes in flight)
        os.environ["OSSRUN_MOE_MMA_SPLIT_K"] = split_k
        split_us[split_k] = bench(lambda i: triton_moe_mma.mlp2(h, experts, weights, *layers[i][1], residual=x), COPIES)
        print(f"  mlp2 + slot sum with K in {split_k} run(s): {split_us[split_k]:7.1f} us ({bytes2 / split_us[split_k] / 1e3:5.0f} GB/s)",
              flush=True)
    os.environ["OSSRUN_MOE_MMA_SPLIT_K"] = env["OSSRUN_MOE_MMA_SPLIT_K"] = min(split_us, key=split_us.get)
    for small in (False, True):  # the model passes small_scales when its scale bytes are all ≤ 128
        us = bench(lambda i: triton_moe_mma.mlp1(t, experts, *layers[i][0], 7.0, small_scales=small), COPIES) + \
            bench(lambda i: triton_moe_mma.mlp2(h, experts, weights, *layers[i][1], residual=x, small_scales=small), COPIES)
        print(f"  {'one' if small else 'two'}-multiply decode: {us:7.1f} us a layer's projections", flush=True)
    return True


def sweep_decode_threshold(layers, kinds: tuple[str, ...], env: dict) -> None:
    norm = RMSNorm(torch.ones(H), 1e-5, torch.device("cuda"), triton=True)
    gate = (torch.randn(E, H, device="cuda", dtype=torch.bfloat16) / 50, torch.randn(E, device="cuda", dtype=torch.bfloat16))
    print(f"whole MoE layer (norm, routing, projections, residual): few-token kernels ({', '.join(kinds)}) vs grouped tl.dot kernel",
          flush=True)
    chosen = {kind: 0 for kind in kinds}
    at_one: dict[str, float] = {}
    previous = 0
    for tokens in (1, 2, 4, 8, 16):
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
        times = {}
        for name, limit in [(kind, "64") for kind in kinds] + [("grouped", "0")]:
            os.environ["OSSRUN_MOE_DECODE_MAX"] = limit
            if name != "grouped":
                os.environ["OSSRUN_MOE_DECODE_KIND"] = name
            times[name] = bench(lambda i: triton_moe.moe_layer(x, norm, gate, K_ROUTE, layers[i][0], layers[i][1], 7.0), COPIES)
        print(f"  {tokens:3d} tokens: " + "   ".join(f"{name} {us:7.1f} us" for name, us in times.items()), flush=True)
        at_one = at_one or times
        for kind in kinds:
            if times[kind] < times["grouped"] and chosen[kind] == previous:  # this kind won at every count so far
                chosen[kind] = tokens
        previous = tokens
    kind = min(kinds, key=lambda k: at_one[k])  # the faster at batch 1 (the latency target); it keeps the counts it wins
    os.environ["OSSRUN_MOE_DECODE_KIND"] = env["OSSRUN_MOE_DECODE_KIND"] = kind
    os.environ["OSSRUN_MOE_DECODE_MAX"] = env["OSSRUN_MOE_DECODE_MAX"] = str(chosen[kind])
    print(f"  few-token kernels: {kind}, up to {chosen[kind]} tokens", flush=True)


def sweep_gemv(env: dict) -> None:
    shapes = {"qkv": (5120, 2880, 8), "out": (2880, 4096, 8), "unembedding": (201088, 2880, 1)}
    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)] for name, (n, k, copies) in shapes.items()}
    biases = {name: torch.randn(n, device="cuda", dtype=torch.bfloat16) for name, (n, _, _) in shapes.items()}
    print("dense GEMVs: cuBLAS (F.linear) vs the Triton GEMV per tile, µs (GB/s)", flush=True)
    totals: dict[tuple[int, str], float] = {}
    tiles = ["cublas"] + [",".join(map(str, t)) for t in triton_gemv.SWEEP_TILES]
    for rows in (1, 2, 4):
        for tile in tiles:
            line, total = [], 0.0
            for name, (n, k, copies) in shapes.items():
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                bias = None if name == "unembedding" else biases[name]
                if tile == "cublas":
                    us = bench(lambda i: F.linear(x, weights[name][i], bias), copies)
                else:
                    os.environ["OSSRUN_GEMV_TILE"] = tile
                    us = bench(lambda i: triton_gemv.gemv(x, weights[name][i], bias), copies)
                total += us * (24 if name != "unembedding" else 1)
                line.append(f"{name} {us:7.1f} ({n * k * 2 / us / 1e3:4.0f})")
            totals[(rows, tile)] = total
            print(f"  rows {rows} {tile:10s}: {'  '.join(line)}   per token {total / 1000:.3f} ms", flush=True)
    best_tile = min(tiles[1:], key=lambda t: totals[(1, t)])
    max_rows = previous = 0
    for rows in (1, 2, 4):
        if totals[(rows, best_tile)] < totals[(rows, "cublas")] and max_rows == previous:  # won at every count so far
            max_rows = rows
        previous = rows
    os.environ["OSSRUN_GEMV_TILE"] = env["OSSRUN_GEMV_TILE"] = best_tile
    os.environ["OSSRUN_GEMV_MAX_ROWS"] = env["OSSRUN_GEMV_MAX_ROWS"] = str(max_rows)
    print(f"  Triton GEMV tile {best_tile}, up to {max_rows} rows", flush=True)


def sweep_attention_splits(env: dict) -> None:
    """Batch-1 decode attention on 20b shapes (64 query heads on 8 KV heads of 64, page 16, bf16 cache) at several
    context lengths, the one-pass kernel against the split-key kernels; the choice minimises a step's attention
    (12 full + 12 sliding layers) summed over the contexts."""
    from ossrun.model.kernels import triton_attention

    page, n_kv, heads, dim, window = 16, 8, 64, 64, 128
    contexts = (576, 4096, 16384)
    n_blocks = max(contexts) // page + 2
    k_cache = torch.randn(n_blocks, page, n_kv, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(1, heads, dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    sinks = torch.randn(heads, device="cuda")
    one = lambda v, dtype: torch.tensor([v], device="cuda", dtype=dtype)  # noqa: E731
    print("batch-1 decode attention, µs a layer (full / sliding 128), one-pass vs keys split:", flush=True)
    cost: dict[str, float] = {}
    for splits in ("1", "8", "16"):
        os.environ["OSSRUN_ATTN_DECODE_SPLITS"] = splits
        line = []
        for context in contexts:
            tables = torch.arange(1, context // page + 2, device="cuda", dtype=torch.long)[None]
            times = []
            for win in (None, window):
                first = max(0, context - window) // page if win else 0
                args = (q, k_cache, v_cache, sinks, win, dim ** -0.5, tables[:, first:], one(first, torch.long),
                        one(context, torch.long), one(0, torch.int32), one(1, torch.int32), one(context - 1, torch.long),
                        one(0, torch.int32), 1, out)
                times.append(bench(lambda i: triton_attention.paged_attention(*args), 1))
            cost[splits] = cost.get(splits, 0.0) + 12 * sum(times)
            line.append(f"{context:6d}: {times[0]:6.1f} / {times[1]:5.1f}")
        print(f"  splits {splits:>2s}  " + "   ".join(line), flush=True)
    best = min(cost, key=cost.get)
    os.environ["OSSRUN_ATTN_DECODE_SPLITS"] = env["OSSRUN_ATTN_DECODE_SPLITS"] = best
    print(f"  keys split in {best} (a step's attention summed over the contexts: "
          + ", ".join(f"{k}: {v / 1000:.2f} ms" for k, v in cost.items()) + ")", flush=True)


def guarded(name: str, part, env: dict, *args):
    """Run one part of the sweep; if it fails, say so, undo the settings it made, and let the other parts run:
    one broken kernel must not cost the device session its other measurements. → the part's result or None."""
    saved_os, saved_env = dict(os.environ), dict(env)
    try:
        return part(*args, env)
    except Exception:  # noqa: BLE001: reported, and the part's settings undone
        traceback.print_exc()
        print(f"  {name}: FAILED (settings left as they were)", flush=True)
        os.environ.clear()
        os.environ.update(saved_os)
        env.clear()
        env.update(saved_env)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-out", default=None, help="write the choices here as export lines")
    parser.add_argument("--parts", default="tiles,mma,threshold,gemv,attention")
    args = parser.parse_args()
    env: dict[str, str] = {}
    parts = args.parts.split(",")
    if "tiles" in parts or "mma" in parts or "threshold" in parts:
        layers = [(expert_weights(2 * I, H), expert_weights(H, I)) for _ in range(COPIES)]
        kinds: tuple[str, ...] = ("gemv",)
        if "tiles" in parts:
            guarded("GEMV tiles", sweep_decode_tiles, env, layers)
            guarded("router", sweep_router, env)
        if "mma" in parts and guarded("tensor-core tiles", sweep_mma_tiles, env, layers):
            kinds = ("gemv", "mma")
        if "threshold" in parts:
            guarded("few-token threshold", sweep_decode_threshold, env, layers, kinds)
        del layers
        torch.cuda.empty_cache()
    if "gemv" in parts:
        guarded("dense GEMVs", sweep_gemv, env)
    if "attention" in parts:
        guarded("attention splits", sweep_attention_splits, env)
    lines = [f"export {k}='{v}'" for k, v in env.items()]
    print("\n".join(lines), flush=True)
    if args.env_out:
        with open(args.env_out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
