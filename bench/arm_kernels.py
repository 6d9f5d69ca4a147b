"""The Arm builds of the CPU kernels, counted: aarch64 instructions each variant executes per unit of work.

No Arm machine is at hand, so this runs the aarch64 builds (`tests/arm_emulation.py`: the cross compiler, qemu's
user-mode emulation) and counts the instructions executed inside the kernel library, one thread, on 20b-shaped
work: a count, not a time (an Arm core retires ~3-4 a cycle; a decode step also waits on memory). `portable` is what
every Arm machine ran before the `dotprod` variant (NEON and sdot); `i8mm` adds smmla for a prompt's MoE products. The last rows add the units of one 20b decode token
(all 24 layers, 4 experts, the unembedding; attention at the given depth) into instructions per token.

    PYTHONPATH=. python bench/arm_kernels.py [--depth 2048]

Needs Debian's gcc-aarch64-linux-gnu and qemu-user. Takes a few minutes (every instruction is logged by qemu).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ossrun.model import mxfp4  # noqa: E402
from ossrun.model.config import PRESETS  # noqa: E402
from ossrun.model.kernels import dense_cpu  # noqa: E402
from tests.arm_emulation import MISSING, ArmLibrary, build_arm_libraries  # noqa: E402

CFG = PRESETS["20b"]
H, I, E = CFG.hidden_size, CFG.intermediate_size, CFG.num_experts
NB = H // 32  # blocks a row of the 20b's 2880-wide products


def dense(lib: ArmLibrary, rows: int, out: int = 64) -> tuple[int, int]:
    """q8_linear: `rows` activation rows times `out` weight rows of 2880 → (instructions, row·block units)."""
    g = torch.Generator().manual_seed(0)
    weight = dense_cpu.quantize_weight(torch.randn(out, H, generator=g) * 0.02)
    x, y = torch.randn(rows, H, generator=g), torch.empty(rows, out)
    status, n = lib.count("q8_linear", x, rows, H, weight.values, weight.scales, float(weight.scale), out, None, y, 1)
    assert status == 0
    return n, rows * out * NB


def moe(lib: ArmLibrary, rows: int, out: int = 64) -> tuple[int, int]:
    """moe_q8_linear: `rows` rows routed to one expert, `out` of its packed rows → (instructions, row·block units)."""
    g = torch.Generator().manual_seed(1)
    blocks, scales = mxfp4.quantize_random(out, H, 1, g, (122, 124, 126, 127, 128, 129))
    x = torch.randn(rows, H, generator=g)
    q, d, s = torch.empty(rows, H, dtype=torch.int8), torch.empty(rows, NB), torch.empty(rows, NB, dtype=torch.int32)
    assert lib.call("moe_q8_quantize", x, rows, H, q, d, s) == 0
    y = torch.empty(rows, out)
    status, n = lib.count("moe_q8_linear", q, d, s, None, H, torch.tensor([0, rows]), torch.tensor([0]), 1, blocks, scales,
                          out, None, y, 1)
    assert status == 0
    return n, rows * out * NB


def quantize(lib: ArmLibrary, rows: int = 16) -> tuple[int, int]:
    """moe_q8_quantize of `rows` rows of 2880 → (instructions, blocks of 32)."""
    x = torch.randn(rows, H)
    q, d, s = torch.empty(rows, H, dtype=torch.int8), torch.empty(rows, NB), torch.empty(rows, NB, dtype=torch.int32)
    status, n = lib.count("moe_q8_quantize", x, rows, H, q, d, s)
    assert status == 0
    return n, rows * NB


def swiglu(lib: ArmLibrary, blocks: int = 64) -> tuple[int, int]:
    """moe_q8_swiglu over `blocks` blocks of 32 outputs → (instructions, blocks)."""
    h, bias, act = torch.randn(blocks, 64) * 3, torch.randn(blocks, 64), torch.empty(blocks, 32)
    return lib.count("moe_q8_swiglu", h, bias, blocks, 7.0, act)[1], blocks


def attention(lib: ArmLibrary, depth: int) -> tuple[int, int]:
    """paged_attention: one decode token over `depth` keys, the 20b's heads (64 query, 8 KV, 64 dims), bf16 cache →
    (instructions, query head·key units)."""
    block = 16
    blocks = -(-depth // block)
    n_kv, hq, dim = CFG.num_key_value_heads, CFG.num_attention_heads, CFG.head_dim
    g = torch.Generator().manual_seed(2)
    k_cache = torch.randn(blocks + 1, block, n_kv, dim, generator=g).bfloat16()
    v_cache = torch.randn(blocks + 1, block, n_kv, dim, generator=g).bfloat16()
    q, out = torch.randn(1, hq, dim, generator=g), torch.empty(1, hq, dim)
    one = lambda v: torch.tensor([v], dtype=torch.int64)
    status, n = lib.count("paged_attention", q, out, k_cache, v_cache, 1, block, n_kv, hq // n_kv, dim, 1, one(0), one(1),
                          one(depth - 1), torch.arange(1, blocks + 1).view(1, -1), blocks, one(0), one(depth),
                          torch.zeros(hq), 0, dim ** -0.5, 1)
    assert status == 0
    return n, hq * depth


def per_token_units(depth: int) -> dict[str, int]:
    """Units one 20b decode token needs, per row of the table."""
    layers, k = CFG.num_hidden_layers, CFG.experts_per_token
    qkv = (CFG.num_attention_heads + 2 * CFG.num_key_value_heads) * CFG.head_dim
    dense_blocks = layers * (qkv * NB + H * (CFG.num_attention_heads * CFG.head_dim // 32)) + CFG.vocab_size * NB
    full_layers = layers // 2  # the others attend over their 128-token window
    return {
        "dense decode": dense_blocks,
        "MoE decode": layers * k * (2 * I * NB + H * (I // 32)),
        "quantise": layers * (NB + k * I // 32) + layers * 2 * NB,  # MoE input, SwiGLU outputs, attention's two products
        "SwiGLU": layers * k * I // 32,
        "attention": CFG.num_attention_heads * (full_layers * depth + (layers - full_layers) * min(depth, CFG.sliding_window)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=2048, help="keys a decode token attends to")
    args = parser.parse_args()
    if MISSING:
        sys.exit(MISSING)
    with tempfile.TemporaryDirectory() as folder:
        libraries = build_arm_libraries(Path(folder))
        rows = {
            "dense decode": lambda lib: dense(lib, 1),
            "dense prefill (16 rows)": lambda lib: dense(lib, 16),
            "MoE decode": lambda lib: moe(lib, 1),
            "MoE prefill (8 rows)": lambda lib: moe(lib, 8),
            "MoE prefill (64 rows)": lambda lib: moe(lib, 64),
            "quantise": quantize,
            "SwiGLU": swiglu,
            "attention": lambda lib: attention(lib, args.depth),
        }
        units = {"dense": "row·block", "MoE": "row·block", "quantise": "block", "SwiGLU": "block", "attention": "head·key"}
        per_unit: dict[str, dict[str, float]] = {isa: {} for isa in libraries}
        print(f"aarch64 instructions per unit of work, one thread (qemu's count; attention at depth {args.depth})")
        print(f"{'kernel':26} {'unit':>10} " + " ".join(f"{isa:>10}" for isa in libraries) + "   ratio")
        for name, measure in rows.items():
            for isa, lib in libraries.items():
                n, work = measure(lib)
                per_unit[isa][name] = n / work
            values = [per_unit[isa][name] for isa in libraries]
            print(f"{name:26} {units[name.split()[0]]:>10} " + " ".join(f"{v:10.2f}" for v in values)
                  + f"   {values[0] / values[-1]:5.1f}x")
        print(f"\none 20b decode token at depth {args.depth} (units x instructions per unit), millions of instructions:")
        total = {isa: 0.0 for isa in libraries}
        for name, count in per_token_units(args.depth).items():
            cells = [per_unit[isa][name] * count / 1e6 for isa in libraries]
            for isa, c in zip(libraries, cells):
                total[isa] += c
            print(f"{name:26} {count / 1e6:9.1f}M " + " ".join(f"{c:10.0f}" for c in cells))
        cells = list(total.values())
        print(f"{'total':26} {'':>10} " + " ".join(f"{c:10.0f}" for c in cells) + f"   {cells[0] / cells[-1]:5.1f}x")


if __name__ == "__main__":
    main()
