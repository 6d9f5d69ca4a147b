"""The Arm (aarch64) builds of the CPU kernels, run under qemu's user-mode emulation, against the same references and
bounds as the x86 builds' tests.

Every aarch64 variant (`build.ARM_VARIANTS`: portable, and `dotprod`'s NEON and sdot paths) is built and called as
`arm_emulation.py` says, on inputs made here in PyTorch. The checks are the x86 tests' own (`check_linear`,
`check_grouped_linear`, `moe_error_bound`): activation quantisation bit for bit, products within the derived
bounds, a whole MoE layer against the exact layer, paged attention against `attention_with_sinks`. Emulation says
nothing of speed (bench/arm_kernels.py counts instructions instead). `.ci/run` installs the cross compiler and qemu; without them these tests skip, saying so.
"""

from __future__ import annotations

import pytest
import torch

from arm_emulation import MISSING, ArmLibrary, build_arm_libraries
from ossrun.model.checkpoint import load_checkpoint, write_random_checkpoint
from ossrun.model.config import PRESETS
from ossrun.model.gpt_oss import MoE
from ossrun.model.kernels import build, dense_cpu
from ossrun.model.kernels.moe_cpu import Q8Experts
from test_attention_cpu_kernel import check, make_case
from test_moe_cpu_kernels import U, check_grouped_linear, check_swiglu, moe_error_bound, reference_quantize, swiglu_operands
from test_q8_kernel import check_linear

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

ARM_ISAS = list(build.ARM_VARIANTS)
THREADS = 2  # the kernels' OpenMP teams run as threads under qemu too


@pytest.fixture(scope="module")
def arm(tmp_path_factory) -> dict[str, ArmLibrary]:
    return build_arm_libraries(tmp_path_factory.mktemp("arm"))


@pytest.mark.parametrize("isa", ARM_ISAS)
def test_activation_quantisation_is_bit_exact(arm, isa):
    """Both layouts (the dense kernel's, the MoE's pairs), including an all-zero block and exact halves."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2880, generator=g) * torch.tensor([1e-3, 1.0, 30.0]).repeat_interleave(960)
    x[2, 32:64] = 0
    x[3, :32] = torch.arange(32) - 15.5
    x[4, 64:68] = torch.tensor([127.0, 2.5, 3.5, -2.5])
    x[4, 68:96] = 0  # scale 1: the halves round to even
    rows, k = x.shape
    q, d = torch.empty(rows, k, dtype=torch.int8), torch.empty(rows, k // 32)
    assert arm[isa].call("q8_quantize_rows", x, rows, k, q, d, THREADS) == 0
    q_ref, d_ref = dense_cpu.quantize_activations(x)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref)
    q, d, s = torch.empty(rows, k, dtype=torch.int8), torch.empty(rows, k // 32), torch.empty(rows, k // 32, dtype=torch.int32)
    assert arm[isa].call("moe_q8_quantize", x, rows, k, q, d, s) == 0
    q_ref, d_ref, s_ref = reference_quantize(x)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("isa", ARM_ISAS)
def test_quantisation_of_non_finite_and_tiny_blocks(arm, isa):
    """Both quantisers: a block holding NaN or ±inf has scale NaN (hunt round 23 B-F1); one too small for its inverse
    scale (max |x| below ~3.7e-37) quantises to 0, as the reference does (B-F2)."""
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(3))
    for row, value in enumerate((float("nan"), float("inf"), float("-inf"))):
        x[row, 40] = value
    x[3, 32:64] = torch.linspace(-1e-40, 1e-40, 32)
    x[3, 64:96] = torch.linspace(-1e-36, 1e-36, 32)
    q, d = torch.empty(4, 96, dtype=torch.int8), torch.empty(4, 3)
    assert arm[isa].call("q8_quantize_rows", x, 4, 96, q, d, THREADS) == 0
    q_ref, d_ref = dense_cpu.quantize_activations(x)
    assert d[:3, 1].isnan().all() and torch.isfinite(d[3]).all() and torch.equal(q[3], q_ref[3]) and torch.equal(d[3], d_ref[3])
    q, d, s = torch.empty(4, 96, dtype=torch.int8), torch.empty(4, 3), torch.empty(4, 3, dtype=torch.int32)
    assert arm[isa].call("moe_q8_quantize", x, 4, 96, q, d, s) == 0
    q_ref, d_ref, s_ref = reference_quantize(x)
    assert d[:3, 1].isnan().all() and torch.isfinite(d[3]).all()
    assert torch.equal(q[3], q_ref[3]) and torch.equal(d[3], d_ref[3]) and torch.equal(s[3], s_ref[3])


@pytest.mark.parametrize("isa", ARM_ISAS)
@pytest.mark.parametrize("m,k,n,with_bias", [(1, 96, 7, True), (3, 2880, 33, True), (5, 160, 64, False), (70, 64, 9, True),
                                             (19, 4096, 33, False)])
def test_dense_linear_within_the_derived_bound(arm, isa, m, k, n, with_bias):
    """Row counts across the 4-row micro-kernel and the 64-row chunk; block counts with and without a tail after the
    steps of four (3, 5, 2, 90, 128 blocks)."""

    def linear(x: torch.Tensor, weight: dense_cpu.Q8Weight, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch.empty(x.shape[0], weight.values.shape[0])
        status = arm[isa].call("q8_linear", x.float().contiguous(), x.shape[0], x.shape[1], weight.values, weight.scales,
                               float(weight.scale), weight.values.shape[0], bias, y, THREADS)
        assert status == 0
        return y

    check_linear(m, k, n, with_bias, linear)


@pytest.mark.parametrize("isa", ARM_ISAS)
@pytest.mark.parametrize("grouping", ["decode", "decode_4", "empty_groups", "prefill"])
def test_grouped_moe_linear_within_the_derived_bound(arm, isa, grouping):
    """Experts grouped as the layer groups them: one row, four rows of four experts, empty experts, long spans."""

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, k = x.shape
        q, d, s = torch.empty(rows, k, dtype=torch.int8), torch.empty(rows, k // 32), torch.empty(rows, k // 32, dtype=torch.int32)
        assert arm[isa].call("moe_q8_quantize", x.float().contiguous(), rows, k, q, d, s) == 0
        return q, d, s

    def grouped_linear(q, d, s, row_of, offsets, experts, blocks, scales, bias) -> torch.Tensor:
        y = torch.empty(int(offsets[-1]), blocks.shape[1])
        status = arm[isa].call("moe_q8_linear", q, d, s, row_of.to(torch.int64).contiguous(), q.shape[1], offsets.to(torch.int64),
                               experts.to(torch.int64), len(experts), blocks.contiguous(), scales.contiguous(), blocks.shape[1],
                               bias.float().contiguous(), y, THREADS)
        assert status == 0
        return y

    check_grouped_linear(grouping, quantize, grouped_linear)


@pytest.mark.parametrize("isa", ARM_ISAS)
def test_swiglu_within_a_few_ulps(arm, isa):
    h, bias = swiglu_operands(seed=12)
    act = torch.empty(h.shape[0], h.shape[1] // 2)
    arm[isa].call("moe_q8_swiglu", h, bias, h.numel() // 64, 7.0, act)
    check_swiglu(act, h, bias, 7.0)


def arm_moe_layer(library: ArmLibrary, q8: Q8Experts, t: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """What `q8(t, experts, weights)` computes, by the Arm build (the same arguments `Q8Experts.__call__` passes)."""
    tokens, k = experts.shape
    pairs = tokens * k
    hidden, inter = q8.hidden, q8.inter
    out = torch.empty(tokens, hidden)
    scratch = [torch.empty(tokens * hidden, dtype=torch.int8), torch.empty(tokens * hidden // 32),
               torch.empty(tokens * hidden // 32, dtype=torch.int32), torch.empty(pairs * inter, dtype=torch.int8),
               torch.empty(pairs * inter // 32), torch.empty(pairs * inter // 32, dtype=torch.int32),
               torch.empty(2 * pairs + 2 * q8.experts + 1, dtype=torch.int64)]
    status = library.call("moe_q8_layer", t.float().contiguous(), tokens, hidden, inter, experts.to(torch.int64).contiguous(),
                          weights.float().contiguous(), k, q8.experts, q8.blocks1, q8.scales1, q8.bias1, q8.blocks2, q8.scales2,
                          q8.bias2, q8.limit, *scratch, out, THREADS)
    assert status == 0
    return out


@pytest.fixture(scope="module")
def wide_layers(tmp_path_factory) -> tuple[MoE, MoE]:
    """One MoE layer of a tiny model made wider (hidden 352 = 11 blocks, intermediate 160 = 5): both projections
    take the kernels' steps of four blocks and their tails. Exact and fast."""
    config = PRESETS["tiny"].replace(vocab_size=1024, num_hidden_layers=1, hidden_size=352, intermediate_size=160)
    checkpoint = load_checkpoint(write_random_checkpoint(config, tmp_path_factory.mktemp("wide"), "original", seed=3))
    tensors = dict(checkpoint.tensors)
    # mlp1's weights / 8: at this width the random ones put most SwiGLU inputs past the clamp, where errors vanish
    tensors["block.0.mlp.mlp1_weight.scales"] = tensors["block.0.mlp.mlp1_weight.scales"] - 3
    make = lambda precision: MoE(checkpoint.config, 0, tensors, torch.float32, torch.device("cpu"), precision)
    return make("exact"), make("fast")


@pytest.mark.parametrize("isa", ARM_ISAS)
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_moe_layer_against_the_exact_layer(arm, wide_layers, isa, rows):
    """The whole fast MoE layer (routing, both projections, SwiGLU, the weighted sum) against the exact layer."""
    exact, fast = wide_layers
    assert fast.use_q8 and not exact.use_q8
    x = torch.randn(rows, exact.config.hidden_size, generator=torch.Generator().manual_seed(rows)) * 2
    t = fast.norm(x)
    experts, weights = fast.route(t)
    got = x + arm_moe_layer(arm[isa], fast.q8, t, experts, weights)
    difference = (got.double() - exact(x).double()).abs()
    bound = moe_error_bound(exact, exact.norm(x)) + 4 * U * (x.double().abs() + 1)
    assert (difference <= bound).all(), f"max excess {(difference - bound).max()}"
    assert difference.max() > 0  # the kernel ran (it quantises)


def arm_attention(library: ArmLibrary):
    """`paged_attention_cpu`'s call (the same arguments), by the Arm build."""

    def attend(q, k_cache, v_cache, query_starts, query_lens, positions, block_tables, first_block, context_lens, sinks, window,
               scale, isa=None) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=torch.float32)
        index = lambda t: t.to(torch.int64).contiguous()
        _, block_size, n_kv, dim = k_cache.shape
        status = library.call("paged_attention", q.float().contiguous(), out, k_cache.contiguous(), v_cache.contiguous(),
                              int(k_cache.dtype == torch.bfloat16), block_size, n_kv, q.shape[1] // n_kv, dim, len(query_starts),
                              index(query_starts), index(query_lens), index(positions), index(block_tables),
                              block_tables.shape[1], index(first_block), index(context_lens), sinks.float().contiguous(),
                              int(window or 0), float(scale), THREADS)
        assert status == 0
        return out

    return attend


# The x86 tests' cases (tests/test_attention_cpu_kernel.py): decodes over ragged tables, a prompt from empty, several
# 256-row jobs, chunks over a cached prefix (several key chunks), mixed steps, windows shorter than the sequences.
ATTENTION_CASES = {
    "decode": dict(contexts=[1, 17, 50, 16, 100], new=[1, 1, 1, 1, 1], window=None),
    "prefill": dict(contexts=[77], new=[77], window=None, seed=1),
    "long_prefill_windowed": dict(contexts=[400], new=[400], window=128, dim=64, seed=13),
    "chunk_over_prefix": dict(contexts=[700, 9], new=[40, 1], window=None, seed=2),
    "chunk_over_prefix_dim64": dict(contexts=[300, 9], new=[40, 1], window=None, dim=64, seed=2),
    "mixed": dict(contexts=[5, 200, 33, 64, 150], new=[5, 1, 20, 1, 64], window=None, seed=3),
    "window_mid_block": dict(contexts=[300, 260, 45, 120], new=[1, 70, 45, 3], window=40, seed=4),
}


@pytest.mark.parametrize("isa", ARM_ISAS)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_paged_attention_against_the_reference(arm, isa, cache_dtype, name):
    case = dict(ATTENTION_CASES[name])
    check(*make_case(case.pop("contexts"), case.pop("new"), cache_dtype=cache_dtype, **case), isa, arm_attention(arm[isa]))
