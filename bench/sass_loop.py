"""Instructions a weight byte in the MoE kernels' main loop, read off the sm_90 SASS, without a GPU.

    PYTHONPATH=. python bench/sass_loop.py            # every few-token MoE kernel configuration
    PYTHONPATH=. python bench/sass_loop.py --ops 12   # and the 12 commonest instructions of each loop

Triton's wheel ships ptxas and nvdisasm: each configuration is compiled for Hopper (as
tests/triton_sm90_compile.py does), disassembled, and its longest backward-branch loop counted: the
instructions one thread issues per iteration, divided by the weight bytes it streams per iteration.
The GEMV kernels at batch 1 ran at ~1.2 TB/s on the H200 while issuing ~17 instructions a byte
(bench/GPU_NOTES.md): this count is the proxy that can be taken on any machine. It is not a time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ossrun.model.kernels import triton_moe_decode, triton_moe_mma  # noqa: E402
from tests.triton_sm90_compile import (DECODE_ALIGNED, MLP1_SIGNATURE, MLP2_SIGNATURE, MMA1_ROUTING, MMA1_SIGNATURE,  # noqa: E402
                                      MMA2_SIGNATURE, aligned)

NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]{4}\*/\s*(?:@!?U?P\w+\s+)?([A-Z0-9_]+(?:\.[A-Z0-9_]+)*)")


def sass(fn, signature: dict, constants: dict, warps: int) -> str:
    sig = {**signature, **{k: "constexpr" for k in constants}}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=aligned(signature, DECODE_ALIGNED)),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([NVDISASM, "-c", path], capture_output=True, text=True, check=True).stdout


def longest_loop(text: str) -> Counter:
    """The instructions (by opcode) between a label and the furthest branch back to it."""
    lines = text.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"\.L_x_\d+:$", line)}
    best = (0, 0)
    for i, line in enumerate(lines):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), i) < i and i - labels[target.group(1)] > best[1] - best[0]:
            best = (labels[target.group(1)], i)
    return Counter(m.group(1) for line in lines[best[0]:best[1] + 1] if (m := INSTRUCTION.match(line)))


def configurations():
    """(name, kernel, signature, constants, warps, weight bytes a thread streams per iteration), 20b shapes, 1 token."""
    for block_n, block_b, warps in triton_moe_decode.SWEEP_TILES_MLP1[:3]:
        yield (f"GEMV mlp1 {block_n},{block_b},{warps}", triton_moe_decode._mlp1_kernel, MLP1_SIGNATURE,
               {"K": 2880, "ROUTE_K": 4, "HAS_BIAS": True, "BLOCK_N": block_n, "BLOCK_B": block_b, "ASM": True}, warps,
               2 * block_n * block_b * 16 / (32 * warps))
    for block_n, block_b, warps in triton_moe_decode.SWEEP_TILES_MLP2[:3]:
        yield (f"GEMV mlp2 {block_n},{block_b},{warps}", triton_moe_decode._mlp2_kernel, MLP2_SIGNATURE,
               {"K": 2880, "ROUTE_K": 4, "K_P": 4, "HAS_BIAS": True, "RESIDUAL": True, "BLOCK_N": block_n, "BLOCK_B": block_b,
                "ASM": True}, warps, 4 * block_n * block_b * 16 / (32 * warps))
    for block_m, nb, warps, stages in triton_moe_mma.SWEEP_TILES:
        for asm in (1, 2):
            common = {"K": 2880, "HAS_BIAS": True, "COLS": 16, "BLOCK_M": block_m, "NB": nb, "STAGES": stages, "ASM": asm,
                      "EMULATE": False}
            per_thread = block_m * nb * 16 / (32 * warps)
            decode = "one multiply" if asm == 2 else "two multiplies"
            yield (f"MMA mlp1 {block_m},{nb},{warps},{stages} {decode}", triton_moe_mma._mlp1_mma_kernel, MMA1_SIGNATURE,
                   {**common, **MMA1_ROUTING}, warps, per_thread)
            yield (f"MMA mlp2 {block_m},{nb},{warps},{stages} {decode}", triton_moe_mma._mlp2_mma_kernel, MMA2_SIGNATURE,
                   {**common, "SPLIT_K": triton_moe_mma.MLP2_SPLIT_K}, warps, per_thread)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=0, help="also print this many of each loop's commonest opcodes")
    parser.add_argument("--only", default="", help="only configurations whose name contains this")
    args = parser.parse_args()
    print(f"{'configuration':44s} {'loop':>6s} {'B/thread':>8s} {'instr/B':>8s}")
    for name, fn, signature, constants, warps, per_thread in configurations():
        if args.only not in name:
            continue
        ops = longest_loop(sass(fn, signature, constants, warps))
        total = sum(ops.values())
        print(f"{name:44s} {total:6d} {per_thread:8.0f} {total / per_thread:8.1f}", flush=True)
        if args.ops:
            print("    " + ", ".join(f"{op} {n}" for op, n in ops.most_common(args.ops)), flush=True)


if __name__ == "__main__":
    main()
