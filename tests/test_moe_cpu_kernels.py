"""The fast MoE kernel (`kernels/moe_q8_cpu.c`): every instruction-set variant this CPU runs, plus forced portable.

Error bounds, derived rather than tuned. An activation block x (32 values) is stored as d·q with
d = amax/127 and q = round(x/d), so each element is off by at most d/2 (times 1 + 2^-20 for the
rounding of 1/d). The weights are exact (E2M1 times a power of two), and the integer block dot
products are exact, so one output o = Σ_j W[o,j]·x[j] is off by at most

    Σ_j |W[o,j]| · d(j)/2                                      (activation quantisation)
  + (K + K/32 + 16) · 2^-24 · Σ_j |W[o,j]|·|x[j]| · 2           (fp32 rounding of both paths)

where d(j) is the scale of j's block. Through a layer (mlp1 → clamped SwiGLU → mlp2 → routing-weighted
sum) the bound is carried element by element: SwiGLU f(g, l) = min(g,L)·σ(α·min(g,L))·(clamp(l)+1)
moves by at most sup|∂f/∂g|·|Δg| + sup|∂f/∂l|·|Δl| over the box of possible inputs, with
|∂f/∂g| ≤ 1.1·(|l|+|Δl|+1) (σ(z) + zσ(z)(1-σ(z)) ≤ 1.0999) and |∂f/∂l| ≤ |g|+|Δg|; the SwiGLU outputs
are quantised again (d/2 each, with d from the largest value the block can hold), then mlp2's bound
and the routing weights follow.
"""

from __future__ import annotations

import pytest
import torch

from ossrun.model import mxfp4
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import MoE
from ossrun.model.kernels import moe_cpu
from ossrun.model.kernels.build import supported_isas

if moe_cpu.library() is None:
    pytest.skip("no C compiler here: the fast MoE kernel is not built", allow_module_level=True)

ISAS = supported_isas()  # always includes "portable"
U = 2.0 ** -24


def to_block_order(values: torch.Tensor) -> torch.Tensor:
    """[..., K] in the natural order → each 32-block's 16 even elements, then its 16 odd ones (decoded weights)."""
    blocks = values.reshape(*values.shape[:-1], -1, 16, 2)
    return torch.cat([blocks[..., 0], blocks[..., 1]], dim=-1).reshape(values.shape)


def to_pair_layout(values: torch.Tensor) -> torch.Tensor:
    """[..., K] in the natural order → the kernels' activation layout: blocks b, b+1 (b even) as
    [b evens | b+1 evens | b odds | b+1 odds], 16 values each; a last block without a partner as [evens | odds]."""
    blocks = to_block_order(values).reshape(*values.shape[:-1], -1, 2, 16)  # [..., nb, (evens, odds), 16]
    nb = blocks.shape[-3]
    paired = blocks[..., : nb - nb % 2, :, :].reshape(*values.shape[:-1], -1, 2, 2, 16).transpose(-3, -2)
    parts = [paired.reshape(*values.shape[:-1], -1)]
    if nb % 2:
        parts.append(blocks[..., -1, :, :].reshape(*values.shape[:-1], 32))
    return torch.cat(parts, dim=-1)


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q8 per 32 values in fp32, as the kernel states it: d = amax/127, q = round(x · (127/amax)), ties to even
    → q in the pair layout, d, and each block's Σq."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.tensor(127.0) / amax
    inverse = torch.where(torch.isfinite(inverse), inverse, torch.zeros_like(inverse))  # all-zero and tiny blocks
    q = torch.round(blocks * inverse).to(torch.int8)
    return to_pair_layout(q.reshape(x.shape)), (amax / 127.0).squeeze(-1), q.int().sum(-1)


def linear_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module docstring's bound for x [R, K] @ weight [O, K]ᵀ (float64 in, [R, O] out)."""
    k = x.shape[1]
    d = x.reshape(x.shape[0], k // 32, 32).abs().amax(-1) / 127.0
    half_step = (d / 2 * (1 + 2.0 ** -20)).repeat_interleave(32, dim=1)
    rounding = 2 * (k + k / 32 + 16) * U * (x.abs() @ weight.abs().T)
    return half_step @ weight.abs().T + rounding


def random_experts(experts: int, out: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return mxfp4.quantize_random(out, k, experts, torch.Generator().manual_seed(seed), (122, 124, 126, 127, 128, 129))


@pytest.mark.parametrize("isa", ISAS)
def test_nibble_decode_is_bit_exact(isa):
    """Every byte value, decoded by the kernel's shuffle, against mxfp4.dequantize (scale 2^0)."""
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16)[torch.randperm(16)].reshape(16, 16)
    blocks = torch.cat([blocks, blocks.flip(-1)])  # every byte at every position parity
    ones = torch.full(blocks.shape[:-1], mxfp4.SCALE_BIAS, dtype=torch.uint8)
    expected = to_block_order(mxfp4.dequantize(blocks, ones, torch.float32))
    decoded = moe_cpu.decode_nibbles(blocks, isa).float() / 2
    assert torch.equal(decoded.view(-1), expected.view(-1))


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantisation_is_bit_exact(isa):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=g) * torch.tensor([1e-3, 1.0, 30.0]).repeat_interleave(32)
    x[2, 32:64] = 0  # an all-zero block: scale 0, values 0
    x[3, :32] = torch.arange(32) - 15.5  # halves after scaling? the largest is exactly ±127
    q, d, s = moe_cpu.quantize_rows(x, isa)
    q_ref, d_ref, s_ref = reference_quantize(x)
    assert torch.equal(q, q_ref)
    assert torch.equal(d, d_ref)
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("isa", ISAS)
def test_a_non_finite_block_has_a_nan_scale(isa):
    """Its max ignored NaN and the conversion saturated inf, so the block quantised to finite numbers (hunt round 23
    B-F1): a NaN scale carries it into every product of the row, as an unquantised product does."""
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4))
    for row, value in enumerate((float("nan"), float("inf"), float("-inf"))):
        x[row, 40] = value
    _, d, _ = moe_cpu.quantize_rows(x, isa)
    assert d[:, 1].isnan().all() and torch.isfinite(d[:, [0, 2]]).all()


@pytest.mark.parametrize("isa", ISAS)
def test_a_block_too_small_to_invert_quantises_to_zero(isa):
    """127/amax overflowed below amax ≈ 3.7e-37: -128 on the SIMD variants, 0 on portable (hunt round 23 B-F2)."""
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(2))
    x[1, 32:64] = torch.linspace(-1e-40, 1e-40, 32)
    x[1, 64:96] = torch.linspace(-1e-36, 1e-36, 32)
    q, d, s = moe_cpu.quantize_rows(x, isa)
    q_ref, d_ref, s_ref = reference_quantize(x)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref) and torch.equal(s, s_ref)
    assert not q[1, 16:32].any() and not q[1, 48:64].any()  # block 1's evens and odds in the pair layout


# Groups of rows per expert: empty experts, one row, odd counts, and more rows than one register tile (4 rows, 8 per chunk).
GROUPINGS = {
    "decode": ([1], [2]),
    "decode_4": ([1, 1, 1, 1], [0, 3, 4, 6]),
    "empty_groups": ([0, 3, 0, 1, 0], [0, 1, 2, 5, 6]),
    "prefill": ([37, 5, 64, 2, 11, 4, 6], [6, 0, 3, 1, 5, 2, 4]),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("grouping", GROUPINGS)
# 11 blocks: one step of eight, a pair and a lone last block in the AVX2 one-row kernel, two quads (one step) and
# the rest in the AVX-512 decode kernel; 13 blocks: three quads (a step and a lone quad), then a lone block
@pytest.mark.parametrize("blocks", [11, 13])
def test_grouped_linear_within_the_derived_bound(isa, grouping, blocks):
    check_grouped_linear(grouping, lambda x: moe_cpu.quantize_rows(x, isa),
                         lambda *operands: moe_cpu.q8_grouped_linear(*operands, isa), k=32 * blocks)


def check_grouped_linear(grouping: str, quantize, grouped_linear, k: int = 352) -> None:
    """`quantize(x)` and `grouped_linear(q, d, s, row_of, offsets, experts, blocks, scales, bias)` (a kernel variant's;
    tests/test_arm_kernels.py passes its Arm builds) on one grouping, within the derived bound, for inputs of width k."""
    sizes, experts = GROUPINGS[grouping]
    # 44 outputs: tiles of 16, 16 and 12 (one 8-row group + 4 single rows)
    out = 44
    blocks, scales = random_experts(7, out, k, seed=2)
    weight = mxfp4.dequantize(blocks, scales, torch.float64)
    bias = torch.randn(7, out, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, k, generator=g) * 4
    rows = int(sum(sizes))
    row_of = torch.randint(0, x.shape[0], (rows,), generator=g)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    q, d, s = quantize(x)
    y = grouped_linear(q, d, s, row_of, offsets, torch.tensor(experts), blocks, scales, bias)
    assert y.shape == (rows, out)
    for group, e in enumerate(experts):
        pick = row_of[offsets[group]:offsets[group + 1]]
        exact = x[pick].double() @ weight[e].T + bias[e].double()
        error = (y[offsets[group]:offsets[group + 1]].double() - exact).abs()
        assert (error <= linear_bound(x[pick].double(), weight[e])).all(), f"expert {e}: max error {error.max()}"


@pytest.mark.parametrize("isa", ISAS)
def test_variants_differ_only_by_summation_order(isa):
    """Same integers, same scales: a variant and portable differ by fp32 rounding alone (both bounded as above)."""
    blocks, scales = random_experts(2, 48, 2880, seed=5)
    x = torch.randn(6, 2880, generator=torch.Generator().manual_seed(6))
    q, d, s = moe_cpu.quantize_rows(x, "portable")
    offsets, experts = torch.tensor([0, 1, 6]), torch.tensor([1, 0])
    portable = moe_cpu.q8_grouped_linear(q, d, s, None, offsets, experts, blocks, scales, None, "portable")
    variant = moe_cpu.q8_grouped_linear(q, d, s, None, offsets, experts, blocks, scales, None, isa)
    weight = mxfp4.dequantize(blocks, scales, torch.float64)
    x_hat = x.double().abs() + (d.double() / 2).repeat_interleave(32, dim=1)  # ≥ |d·q| elementwise
    magnitude = torch.cat([x_hat[:1] @ weight[1].abs().T, x_hat[1:] @ weight[0].abs().T])
    assert ((variant.double() - portable.double()).abs() <= 4 * (2880 + 90 + 16) * U * magnitude).all()


def swiglu_operands(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved (glu, linear) inputs and biases over the range where the vector exp is within its ulps: glu down
    to -50 (past about -52, e^(-1.702 glu) meets the exp's clamp at 88.4 and only the sign and a tiny size are
    promised), up past the limit (clamped to it), linear on both sides of ±limit."""
    g = torch.Generator().manual_seed(seed)
    h = torch.empty(40, 64)
    h[:, 0::2] = torch.rand(40, 32, generator=g) * 60 - 50
    h[:, 1::2] = torch.rand(40, 32, generator=g) * 20 - 10
    h[0, 0:8] = torch.tensor([0.0, 0.0, 7.0, -7.0, 7.5, 7.0, -50.0, 3.0])
    return h, torch.randn(40, 64, generator=g) * 0.1


def check_swiglu(act: torch.Tensor, h: torch.Tensor, bias: torch.Tensor, limit: float) -> None:
    """Against the float64 reference: 8 ulps (the exp's ~1, 1 + e, a division, a product) plus the exponent's own
    rounding, which e^x turns into a relative error of |x| times it: x = -1.702·glu is one fp32 product of an fp32
    alpha (each ≤ 1 ulp of |x|), so 2·|x| ulps more (at glu = -50, 170 ulps: the conditioning, not the kernel)."""
    x = h + bias  # in fp32, as the kernel adds them
    exact = F_swiglu(x.double(), limit)
    glu = x[..., 0::2].clamp(max=limit).double()
    bound = (8 + 2 * 1.702 * glu.abs()) * U * exact.abs() + 1e-37
    assert ((act.double() - exact).abs() <= bound).all(), ((act.double() - exact).abs() / bound).max()


@pytest.mark.parametrize("isa", ISAS)
def test_swiglu_within_a_few_ulps(isa):
    """The layer's SwiGLU block (16, 8 or 1 lanes by variant): clamps, alpha, the vector exp."""
    h, bias = swiglu_operands(seed=12)
    check_swiglu(moe_cpu.swiglu_blocks(h, bias, 7.0, isa), h, bias, 7.0)


def test_sizes_that_are_not_blocks_are_refused():
    with pytest.raises(ValueError):
        moe_cpu.quantize_rows(torch.zeros(2, 40))


def swiglu_error(h: torch.Tensor, dh: torch.Tensor, limit: float) -> torch.Tensor:
    """How far gpt-oss's SwiGLU can move when its interleaved inputs h move by at most dh (see module docstring)."""
    glu, lin, dglu, dlin = h[..., 0::2], h[..., 1::2], dh[..., 0::2], dh[..., 1::2]
    sup_dg = 1.1 * ((lin.abs() + dlin).clamp(max=limit) + 1)
    sup_dl = glu.abs() + dglu
    return sup_dg * dglu + sup_dl * dlin


def moe_error_bound(moe: MoE, t: torch.Tensor) -> torch.Tensor:
    """Per-element bound [T, H] on |fast − exact| of one MoE layer's expert sum for normed inputs t."""
    experts, weights = moe.route(t)
    limit = moe.config.swiglu_limit
    t64 = t.double()
    bound = torch.zeros_like(t64)
    for e in experts.unique().tolist():
        tokens, slots = torch.nonzero(experts == e, as_tuple=True)
        w1 = mxfp4.dequantize(moe.mlp1_blocks[e], moe.mlp1_scales[e], torch.float64)
        w2 = mxfp4.dequantize(moe.mlp2_blocks[e], moe.mlp2_scales[e], torch.float64)
        h = t64[tokens] @ w1.T + moe.mlp1_bias[e].double()
        dh = linear_bound(t64[tokens], w1)
        act = F_swiglu(h, limit)
        dact = swiglu_error(h, dh, limit) * (1 + 1e-6) + 4 * U * act.abs()
        # The fast path quantises its own SwiGLU outputs: their block's amax is at most amax + max Δ.
        amax = (act.abs() + dact).reshape(act.shape[0], -1, 32).amax(-1)
        quant = (amax / 127 / 2 * (1 + 2.0 ** -20)).repeat_interleave(32, dim=1)
        k = act.shape[1]
        rounding = 2 * (k + k / 32 + 16) * U * ((act.abs() + dact) @ w2.abs().T)
        dy = (dact + quant) @ w2.abs().T + rounding
        bound.index_add_(0, tokens, dy * weights[tokens, slots].double().unsqueeze(1))
    return bound


def F_swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    from ossrun.model.gpt_oss import swiglu

    return swiglu(h, limit)


@pytest.fixture(scope="module")
def tiny_layers(checkpoints):
    checkpoint = load_checkpoint(checkpoints["original"])
    make = lambda precision: MoE(checkpoint.config, 1, checkpoint.tensors, torch.float32, torch.device("cpu"), precision)
    return make("exact"), make("fast")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_fused_layer_against_the_exact_layer_on_tiny(tiny_layers, rows, isa, monkeypatch):
    """The whole fast MoE layer (one native call) against the exact layer, within the derived bound."""
    monkeypatch.setenv("OSSRUN_CPU_ISA", isa)
    exact, fast = tiny_layers
    assert fast.use_q8 and not exact.use_q8
    x = torch.randn(rows, exact.config.hidden_size, generator=torch.Generator().manual_seed(rows)) * 2
    difference = (fast(x).double() - exact(x).double()).abs()
    bound = moe_error_bound(exact, exact.norm(x)) + 4 * U * (x.double().abs() + 1)  # + the residual add in fp32
    assert (difference <= bound).all(), f"max excess {(difference - bound).max()}"
    assert difference.max() > 0  # the fast path really ran (it quantises)


@pytest.mark.parametrize("amx", ["1", "0"])
def test_prompt_layer_on_tiles_against_the_exact_layer(tiny_layers, amx, monkeypatch):
    """From 96 tokens, AMX (where the CPU has it and Linux grants it) runs both projections as 16 x 16 tile products;
    without it the VNNI kernels do. 200 tokens: every expert's pairs end in a partly filled tile."""
    monkeypatch.setenv("OSSRUN_CPU_ISA", ISAS[-1])
    monkeypatch.setenv("OSSRUN_CPU_AMX", amx)
    library = moe_cpu.library()
    if amx == "1" and not (library is not None and library.moe_q8_amx_active()):
        pytest.skip("no AMX here (the CPU lacks AMX-INT8, Linux refused the tile state, or the variant is not avx512vnni or avx512bf16)")
    exact, fast = tiny_layers
    x = torch.randn(200, exact.config.hidden_size, generator=torch.Generator().manual_seed(200)) * 2
    difference = (fast(x).double() - exact(x).double()).abs()
    bound = moe_error_bound(exact, exact.norm(x)) + 4 * U * (x.double().abs() + 1)
    assert (difference <= bound).all(), f"max excess {(difference - bound).max()}"
    assert difference.max() > 0


def test_expert_ids_out_of_range_are_refused(tiny_layers):
    _, fast = tiny_layers
    x = torch.zeros(2, fast.config.hidden_size)
    weights = torch.full((2, fast.config.experts_per_token), 0.25)
    for bad in (fast.config.num_experts, -1):
        experts = torch.tensor([[0, 1, 2, 3], [4, 5, 6, bad]])
        with pytest.raises(ValueError, match="expert ids"):
            fast.q8(x, experts, weights)


def test_layer_groups_pairs_like_the_reference(tiny_layers):
    """Repeated, unsorted and absent experts: the one-call layer equals the sum of its experts one by one."""
    _, fast = tiny_layers
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, fast.config.hidden_size, generator=g)
    experts = torch.tensor([[7, 0, 3, 5], [0, 7, 5, 3], [2, 2, 2, 2], [5, 3, 0, 7], [1, 6, 4, 2], [3, 3, 7, 0]])
    weights = torch.rand(6, 4, generator=g)
    together = fast.q8(x, experts, weights)
    one_by_one = sum(fast.q8(x, experts[:, j:j + 1], weights[:, j:j + 1]) for j in range(4))
    assert torch.allclose(together, one_by_one, rtol=1e-5, atol=1e-5 * float(one_by_one.abs().max()))


@pytest.mark.parametrize("rows", [40, 200])  # the VNNI kernels; the tiles where AMX runs
def test_same_bits_at_any_thread_count(tiny_layers, rows):
    """Each output is one work item's, summed in a fixed order: the team size (torch's thread count) changes no bit."""
    _, fast = tiny_layers
    x = torch.randn(rows, fast.config.hidden_size, generator=torch.Generator().manual_seed(11))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fast(x))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])
