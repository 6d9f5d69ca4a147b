"""Compile every Triton kernel configuration the model launches for Hopper (sm_90), without a GPU (and the
tensor-core MoE kernels for Ampere, sm_80, whose PTX must not use Hopper-only instructions).

Run in its own process (TRITON_INTERPRET unset: the interpreter never runs Triton's compiler),
by tests/test_triton_kernels.py. The interpreter accepts code the compiler rejects (globals read
inside a kernel, unsupported casts); this catches that on any machine with Triton's wheel, which
ships ptxas. Prints one line per configuration: shared memory, and local-memory (spill) uses.
"""

from __future__ import annotations

import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ossrun.model.kernels import triton_attention, triton_fused, triton_gemv, triton_moe, triton_moe_decode, triton_moe_mma  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)

MOE_SIGNATURE = {
    "x_ptr": "*bf16", "y_ptr": "*bf16", "blocks_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*bf16",
    "counts_ptr": "*i64", "order_ptr": "*i64", "row_weight_ptr": "*bf16", "N_OUT": "i32", "swiglu_limit": "fp32",
    "stride_xm": "i32", "stride_ym": "i32", "stride_be": "i32", "stride_bo": "i32", "stride_se": "i32", "stride_so": "i32",
    "stride_biase": "i32",
}
ATTENTION_SIGNATURE = {
    "q_ptr": "*bf16", "out_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "sinks_ptr": "*fp32",
    "tables_ptr": "*i64", "first_block_ptr": "*i64", "context_ptr": "*i64", "q_start_ptr": "*i32", "q_len_ptr": "*i32",
    "positions_ptr": "*i64", "seqs_ptr": "*i32", "n_table": "i32", "window": "i32", "scale": "fp32",
    "stride_qt": "i32", "stride_qh": "i32", "stride_ot": "i32", "stride_oh": "i32", "stride_kb": "i32", "stride_ks": "i32",
    "stride_kh": "i32", "stride_tb": "i32",
}


DECODE_WEIGHTS = {"blocks_ptr": "*u8", "scales_ptr": "*u8", "bias_ptr": "*bf16", "experts_ptr": "*i32"}
DECODE_STRIDES = {name: "i32" for name in ("stride_be", "stride_bo", "stride_se", "stride_so", "stride_biase")}
MLP1_SIGNATURE = {"t_ptr": "*bf16", "h_ptr": "*bf16", **DECODE_WEIGHTS, "N_OUT": "i32", "swiglu_limit": "fp32",
                  "stride_t": "i32", "stride_h": "i32", **DECODE_STRIDES}
MLP2_SIGNATURE = {"h_ptr": "*bf16", "x_ptr": "*bf16", "y_ptr": "*bf16", **DECODE_WEIGHTS, "weights_ptr": "*bf16", "N_OUT": "i32",
                  "stride_h": "i32", "stride_x": "i32", "stride_y": "i32", **DECODE_STRIDES}
MMA1_SIGNATURE = {"t_ptr": "*bf16", "h_ptr": "*bf16", **DECODE_WEIGHTS, "logits_ptr": "*fp32", "weights_ptr": "*bf16", "PAIRS": "i32",
                  "N_OUT": "i32", "swiglu_limit": "fp32", "stride_t": "i32", "stride_h": "i32", **DECODE_STRIDES}
MMA1_ROUTING = {"ROUTE": True, "E": 32, "E_P": 32, "K_P": 4, "ROUTE_K": 4}  # the first projection routes (top-k of 32)
MMA2_SIGNATURE = {"h_ptr": "*bf16", "part_ptr": "*fp32", **DECODE_WEIGHTS, "weights_ptr": "*bf16", "PAIRS": "i32", "N_OUT": "i32",
                  "stride_h": "i32", "stride_p": "i32", "stride_ps": "i32", **DECODE_STRIDES}
DECODE_ALIGNED = ("N_OUT", "stride_t", "stride_h", "stride_x", "stride_y", "stride_p", "stride_ps", "stride_be", "stride_bo", "stride_se",
                  "stride_biase")  # 20b
GEMV_TILES = triton_gemv.SWEEP_TILES
# The decode tiles: the default and the ones bench/gpu_sweep.py times (BLOCK_N, BLOCK_B, warps).


def aligned(signature: dict, ints: tuple[str, ...] = ()) -> dict:
    """What a launch on real tensors tells the compiler: pointers and the named ints are multiples of 16
    (Triton specialises on that; without it no load is vectorised, so the PTX would not be the GPU's)."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items()) if kind.startswith("*") or name in ints}


def compile_one(fn, signature: dict, constants: dict, name: str, warps: int = 4, attrs: dict | None = None,
                target: GPUTarget = TARGET, pdl: bool = False) -> str:
    """→ the PTX (tests/ptx_report.py reads it). `pdl`: with programmatic dependent launch (kernels that take PDL)."""
    if "PDL" in fn.arg_names:
        constants = {**constants, "PDL": pdl}
        name += " pdl" if pdl else ""
    sig = {**signature, **{k: "constexpr" for k in constants}}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=attrs), target=target,
                            options={"num_warps": warps, "launch_pdl": pdl})
    ptx = kernel.asm["ptx"]
    print(f"{name}: shared {kernel.metadata.shared} B, local-memory uses {ptx.count('.local')}", flush=True)
    return ptx


def main() -> int:
    for swiglu in (True, False):  # the first projection gathers its rows, the second scatters them
        for block_m in (16, 32, 64):
            constants = {"K": 2880, "N_EXPERTS": 32, "GATHER": swiglu, "SCATTER": not swiglu, "ROUTE_K": 4, "SWIGLU": swiglu, "HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128,
                         "EMULATE": False}
            compile_one(triton_moe._mxfp4_grouped_kernel, MOE_SIGNATURE, constants, f"moe swiglu={swiglu} block_m={block_m}")
    for sliding in (True, False):
        for block_t, block_n in ((2, 64), (16, 64), (2, 128), (2, 256)):  # decode tiles: bench/gpu.py's graph replay times them
            constants = {"GROUP": 8, "GROUP_P": 8, "HEAD_DIM": 64, "PAGE": 16, "BLOCK_T": block_t, "BLOCK_N": block_n,
                         "SLIDING": sliding, "EMULATE": False, "IEEE": False}
            compile_one(triton_attention._paged_attention_kernel, ATTENTION_SIGNATURE, constants,
                        f"attention sliding={sliding} block_t={block_t} block_n={block_n}")
    split = {"q_ptr": "*bf16", "part_ptr": "*fp32", "stats_ptr": "*fp32", "k_ptr": "*bf16", "v_ptr": "*bf16", "tables_ptr": "*i64",
             "first_block_ptr": "*i64", "context_ptr": "*i64", "q_start_ptr": "*i32", "positions_ptr": "*i64", "seqs_ptr": "*i32",
             "n_table": "i32", "window": "i32", "scale": "fp32", "stride_qt": "i32", "stride_qh": "i32", "stride_kb": "i32",
             "stride_ks": "i32", "stride_kh": "i32", "stride_tb": "i32"}
    for sliding in (True, False):
        for splits in (8, 16):
            compile_one(triton_attention._decode_split_kernel, split, {"GROUP": 8, "ROWS": 16, "HEAD_DIM": 64, "PAGE": 16, "BLOCK_N": 64,
                        "SPLITS": splits, "SLIDING": sliding, "EMULATE": False, "IEEE": False},
                        f"attention decode split sliding={sliding} splits={splits}")
    for splits in (8, 16):
        compile_one(triton_attention._decode_combine_kernel, {"part_ptr": "*fp32", "stats_ptr": "*fp32", "sinks_ptr": "*fp32",
                    "out_ptr": "*bf16", "q_start_ptr": "*i32", "seqs_ptr": "*i32", "stride_ot": "i32", "stride_oh": "i32"},
                    {"GROUP": 8, "ROWS": 16, "HEAD_DIM": 64, "SPLITS": splits}, f"attention decode combine splits={splits}")
    fp32 = {**ATTENTION_SIGNATURE, **{name: "*fp32" for name in ("q_ptr", "out_ptr", "k_ptr", "v_ptr")}}
    compile_one(triton_attention._paged_attention_kernel, fp32, {"GROUP": 4, "GROUP_P": 4, "HEAD_DIM": 16, "PAGE": 16, "BLOCK_T": 4,
                "BLOCK_N": 64, "SLIDING": True, "EMULATE": False, "IEEE": True}, "attention fp32 (ieee)")
    compile_one(triton_moe._route_kernel, {"logits_ptr": "*bf16", "experts_ptr": "*i64", "weights_ptr": "*bf16", "counts_ptr": "*i32",
                "rank_ptr": "*i32", "stride_l": "i32"}, {"E": 32, "E_P": 32, "K": 4, "K_P": 4}, "route")
    compile_one(triton_moe._order_kernel, {"experts_ptr": "*i64", "rank_ptr": "*i32", "counts_ptr": "*i32", "order_ptr": "*i64",
                "P": "i32"}, {"E": 32, "E_P": 32, "BLOCK": 128}, "order")
    compile_one(triton_fused._rms_norm_kernel, {"x_ptr": "*bf16", "w_ptr": "*fp32", "y_ptr": "*bf16", "stride_x": "i32",
                "stride_y": "i32", "eps": "fp32"}, {"N": 2880, "BLOCK": 4096}, "rms_norm")
    compile_one(triton_fused._rope_cache_kernel, {"qkv_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64",
                "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "stride_qkv": "i32", "stride_cos": "i32", "stride_qt": "i32",
                "stride_slot": "i32", "stride_head": "i32"}, {"HQ": 64, "HKV": 8, "HQ_P": 64, "HKV_P": 8, "D": 64}, "rope_and_cache")
    for block_e, warps in triton_moe_decode.SWEEP_ROUTER_TILES:
        compile_one(triton_moe_decode._norm_logits_kernel, {"x_ptr": "*bf16", "norm_ptr": "*fp32", "t_ptr": "*bf16", "gate_ptr": "*bf16",
                    "gate_bias_ptr": "*bf16", "logits_ptr": "*fp32", "stride_x": "i32", "stride_t": "i32", "stride_g": "i32", "eps": "fp32"},
                    {"H": 2880, "H_P": 4096, "E": 32, "BLOCK_E": block_e, "DEINTERLEAVE": False}, f"norm_logits {block_e},{warps}", warps=warps)
    compile_one(triton_moe_decode._norm_logits_kernel, {"x_ptr": "*bf16", "norm_ptr": "*fp32", "t_ptr": "*bf16", "gate_ptr": "*bf16",
                "gate_bias_ptr": "*bf16", "logits_ptr": "*fp32", "stride_x": "i32", "stride_t": "i32", "stride_g": "i32", "eps": "fp32"},
                {"H": 2880, "H_P": 4096, "E": 32, "BLOCK_E": 4, "DEINTERLEAVE": True}, "norm_logits deinterleaved", warps=8)
    for block_m, nb, warps, stages in triton_moe_mma.SWEEP_TILES:  # the swap-AB tensor-core kernels
        default = (block_m, nb, warps, stages) == triton_moe_mma.SWEEP_TILES[0]
        for cols, asm in ((16, 1), (32, 1), (16, 2)) if default else ((16, 1),):  # asm 2: the one-multiply decode
            common = {"K": 2880, "HAS_BIAS": True, "COLS": cols, "BLOCK_M": block_m, "NB": nb, "STAGES": stages, "ASM": asm,
                      "EMULATE": False}
            name = f"{block_m},{nb},{warps},{stages} cols {cols} asm {asm}"
            compile_one(triton_moe_mma._mlp1_mma_kernel, MMA1_SIGNATURE, {**common, **MMA1_ROUTING}, f"moe mma mlp1 {name}", warps,
                        aligned(MMA1_SIGNATURE, DECODE_ALIGNED))
            compile_one(triton_moe_mma._mlp2_mma_kernel, MMA2_SIGNATURE, {**common, "SPLIT_K": triton_moe_mma.MLP2_SPLIT_K},
                        f"moe mma mlp2 {name}", warps, aligned(MMA2_SIGNATURE, DECODE_ALIGNED))
    for asm in (1, 2):  # Ampere (A100) too: the decode's PTX uses bf16x2 fma (sm_80), not sm_90's bf16x2 mul
        block_m, nb, warps, stages = triton_moe_mma.SWEEP_TILES[0]
        common = {"K": 2880, "HAS_BIAS": True, "COLS": 16, "BLOCK_M": block_m, "NB": nb, "STAGES": stages, "ASM": asm, "EMULATE": False}
        compile_one(triton_moe_mma._mlp1_mma_kernel, MMA1_SIGNATURE, {**common, **MMA1_ROUTING}, f"moe mma mlp1 sm_80 asm {asm}", warps,
                    aligned(MMA1_SIGNATURE, DECODE_ALIGNED), GPUTarget("cuda", 80, 32))
        compile_one(triton_moe_mma._mlp2_mma_kernel, MMA2_SIGNATURE, {**common, "SPLIT_K": 2}, f"moe mma mlp2 sm_80 asm {asm}", warps,
                    aligned(MMA2_SIGNATURE, DECODE_ALIGNED), GPUTarget("cuda", 80, 32))
    compile_one(triton_moe_mma._combine_kernel, {"part_ptr": "*fp32", "x_ptr": "*bf16", "y_ptr": "*bf16", "N": "i32", "stride_p": "i32",
                "stride_ps": "i32", "stride_x": "i32", "stride_y": "i32"}, {"ROUTE_K": 4, "SPLIT_K": triton_moe_mma.MLP2_SPLIT_K,
                "BLOCK": 1024}, "moe mma combine")
    compile_one(triton_moe_decode._topk_kernel, {"logits_ptr": "*fp32", "experts_ptr": "*i32", "weights_ptr": "*bf16"},
                {"E": 32, "E_P": 32, "K": 4, "K_P": 4}, "topk", warps=1)
    for mlp, tiles in ((1, triton_moe_decode.SWEEP_TILES_MLP1), (2, triton_moe_decode.SWEEP_TILES_MLP2)):
        kernel = triton_moe_decode._mlp1_kernel if mlp == 1 else triton_moe_decode._mlp2_kernel
        signature = MLP1_SIGNATURE if mlp == 1 else MLP2_SIGNATURE
        for block_n, block_b, warps in tiles:
            for asm in (True, False) if (block_n, block_b, warps) == tiles[0] else (True,):
                common = {"K": 2880, "ROUTE_K": 4, "HAS_BIAS": True, "BLOCK_N": block_n, "BLOCK_B": block_b, "ASM": asm}
                if mlp == 2:
                    common.update(K_P=4, RESIDUAL=True)
                compile_one(kernel, signature, common, f"moe decode mlp{mlp} {block_n},{block_b},{warps}{' asm' if asm else ''}", warps,
                            aligned(signature, DECODE_ALIGNED))
    gemv = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "r_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*fp32", "N": "i32",
            "stride_x": "i32", "stride_w": "i32", "stride_r": "i32", "stride_y": "i32", "eps": "fp32"}
    gemv_aligned = tuple(name for name in gemv if name != "eps")
    for block_n, block_k, warps in GEMV_TILES:
        for norm in (False, True) if (block_n, block_k, warps) == GEMV_TILES[0] else (False,):
            compile_one(triton_gemv._gemv_kernel, gemv, {"K": 2880, "HAS_BIAS": True, "RESIDUAL": not norm, "NORM": norm,
                        "BLOCK_N": block_n, "BLOCK_K": block_k}, f"gemv {block_n},{block_k},{warps}{' norm' if norm else ''}", warps,
                        aligned(gemv, gemv_aligned))
    # Programmatic dependent launch (OSSRUN_PDL=1): one configuration of each kernel of a batch-1 decode step.
    compile_one(triton_fused._rms_norm_kernel, {"x_ptr": "*bf16", "w_ptr": "*fp32", "y_ptr": "*bf16", "stride_x": "i32",
                "stride_y": "i32", "eps": "fp32"}, {"N": 2880, "BLOCK": 4096}, "rms_norm", pdl=True)
    block_n, block_k, warps = GEMV_TILES[0]
    compile_one(triton_gemv._gemv_kernel, gemv, {"K": 2880, "HAS_BIAS": True, "RESIDUAL": True, "NORM": False, "BLOCK_N": block_n,
                "BLOCK_K": block_k}, f"gemv {block_n},{block_k},{warps}", warps, aligned(gemv, gemv_aligned), pdl=True)
    compile_one(triton_attention._paged_attention_kernel, ATTENTION_SIGNATURE, {"GROUP": 8, "GROUP_P": 8, "HEAD_DIM": 64, "PAGE": 16,
                "BLOCK_T": 2, "BLOCK_N": 128, "SLIDING": True, "EMULATE": False, "IEEE": False}, "attention decode", pdl=True)
    block_m, nb, warps, stages = triton_moe_mma.SWEEP_TILES[0]
    compile_one(triton_moe_mma._mlp1_mma_kernel, MMA1_SIGNATURE, {"K": 2880, "HAS_BIAS": True, "COLS": 16, "BLOCK_M": block_m, "NB": nb,
                "STAGES": stages, "ASM": 2, "EMULATE": False, **MMA1_ROUTING}, "moe mma mlp1", warps, aligned(MMA1_SIGNATURE, DECODE_ALIGNED),
                pdl=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
