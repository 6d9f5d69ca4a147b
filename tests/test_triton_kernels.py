"""The Triton kernels against the PyTorch reference: on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set by conftest for `--device cpu`), compiled on a GPU with `--device cuda`.

Tolerances: the MXFP4 matmul multiplies bf16-rounded activations by exactly decoded weights, so
against an fp32 matmul of the same operands only the summation order differs (1e-5 of the
output's scale; 1e-4 on tensor cores, whose fp32 accumulation rounds differently). Attention in
fp32 caches differs from the reference only by the online softmax's order (1e-5); with bf16
caches both sides round P to bf16 at different points, and the interpreter truncates where
the GPU rounds (2e-2).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # sigmoid(-large) in the interpreter
triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'triton==3.6.0'; Linux only)")

from ossrun.model import mxfp4  # noqa: E402
from ossrun.model.attention import PagedAttention, PagedGroup  # noqa: E402
from ossrun.model.gpt_oss import swiglu  # noqa: E402
from ossrun.model.kernels.triton_moe import mxfp4_grouped_matmul  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


# ---------------------------------------------------------------- MXFP4 grouped matmul

def moe_reference(x, counts, blocks, scales, bias, limit):
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        w = mxfp4.dequantize(blocks[e], scales[e], torch.float32)
        h = x[start:start + n].bfloat16().float() @ w.T + bias[e]
        out.append(swiglu(h, limit) if limit is not None else h)
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("counts", [
    [3, 0, 20, 1],  # an empty expert, one over a 16-row tile
    [0, 0, 0, 5],  # everything in the last expert
    [1, 1, 1, 1],  # decode-like: one row each
    [0, 37, 0, 0],  # one expert, three tiles
    [70, 2, 0, 9],  # 64-row tiles (mean group ≥ 17)
])
@pytest.mark.parametrize("limit", [None, 7.0])
def test_mxfp4_grouped_matmul_equals_dequantize_then_matmul(counts, limit, device):
    g = torch.Generator().manual_seed(sum(counts) + (limit is None))
    n_experts, n_out, k = 4, 96, 96  # K not a multiple of the 128-wide K tile: masked tail
    blocks, scales = mxfp4.quantize_random(n_out, k, n_experts, g, (119, 123, 127, 129, 131))
    bias = torch.randn(n_experts, n_out, generator=g)
    counts_t = torch.tensor(counts)
    # bf16-representable inputs: the interpreter truncates fp32→bf16 where the GPU rounds to nearest.
    x = (torch.randn(int(counts_t.sum()), k, generator=g) * 4).bfloat16().float()
    y = mxfp4_grouped_matmul(x.to(device), counts_t.to(device), blocks.to(device), scales.to(device), bias.to(device),
                             swiglu_limit=limit, out_dtype=torch.float32)
    ref = moe_reference(x, counts_t, blocks, scales, bias, limit)
    assert y.shape == ref.shape
    assert rel_err(y.cpu(), ref) < (1e-5 if device.type == "cpu" else 1e-4)


def test_mxfp4_decode_is_exact_for_every_nibble_and_extreme_scales(device):
    """Identity activations read the decoded weights back: every code, scale bytes 2 (2^-125) to 240 (2^113)."""
    k = 32
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 1, 16)  # every byte once: both nibbles of all codes
    scales = torch.tensor([2, 3, 100, 127, 128, 140, 200, 127, 126, 5, 60, 127, 127, 150, 90, 240], dtype=torch.uint8).view(1, 16, 1)
    x = torch.eye(k)
    y = mxfp4_grouped_matmul(x.to(device), torch.tensor([k], device=device), blocks.to(device), scales.to(device), None,
                             out_dtype=torch.float32)
    w = mxfp4.dequantize(blocks[0], scales[0], torch.float32)  # [16, 32]
    assert torch.equal(y.cpu(), w.T)


def test_mxfp4_bf16_output_and_no_rows(device):
    g = torch.Generator().manual_seed(3)
    blocks, scales = mxfp4.quantize_random(64, 64, 2, g, (125, 127))
    x = torch.randn(5, 64, generator=g)
    counts = torch.tensor([2, 3])
    y = mxfp4_grouped_matmul(x.bfloat16().to(device), counts.to(device), blocks.to(device), scales.to(device), None)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.cpu(), moe_reference(x, counts, blocks, scales, torch.zeros(2, 64), None)) < 1e-2
    empty = mxfp4_grouped_matmul(x[:0].to(device), torch.zeros(2, dtype=torch.long, device=device), blocks.to(device),
                                 scales.to(device), None)
    assert empty.shape == (0, 64)


# ---------------------------------------------------------------- MoE for few tokens (GEMV kernels)

DECODE_TILES = [None, "32,2,4;64,2,2"]  # the default tiles; wide tiles with masked column and K tails


DECODE_EXPERTS = [
    [[0, 1, 2, 3]],  # batch 1
    [[2, 0, 3, 1], [2, 0, 3, 1], [3, 2, 1, 0]],  # every token in the same four experts (experts 4, 5 empty)
    [[5, 4, 0, 1], [0, 2, 3, 4], [1, 5, 2, 3], [4, 3, 5, 0], [2, 1, 4, 5]],  # spread over all six
]


def decode_case(experts: list[list[int]], seed: int) -> dict:
    """A few-token MoE case: 6 experts, hidden 96 (3 blocks of 32: a masked K tail for 2- and 4-block iterations),
    intermediate 64, top-4; with the fp32 references of both projections (h_ref from t, y_ref from bf16-rounded h_ref)."""
    g = torch.Generator().manual_seed(seed)
    n_experts, hidden, inter, k = 6, 96, 64, 4
    b1, s1 = mxfp4.quantize_random(2 * inter, hidden, n_experts, g, (119, 123, 127, 129, 131))
    b2, s2 = mxfp4.quantize_random(hidden, inter, n_experts, g, (120, 124, 127, 130))
    bias1, bias2 = torch.randn(n_experts, 2 * inter, generator=g), torch.randn(n_experts, hidden, generator=g)
    chosen = torch.tensor(experts, dtype=torch.int32)
    tokens = chosen.shape[0]
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    t = (torch.randn(tokens, hidden, generator=g) * 4).bfloat16().float()
    x = torch.randn(tokens, hidden, generator=g)
    pairs = list(enumerate(chosen.reshape(-1).tolist()))
    h_ref = torch.stack([swiglu(t[p // k] @ mxfp4.dequantize(b1[e], s1[e], torch.float32).T + bias1[e], 7.0) for p, e in pairs])
    h_in = h_ref.bfloat16().float()
    y_ref = x.clone()
    for p, e in pairs:
        y_ref[p // k] += weights.reshape(-1)[p] * (h_in[p] @ mxfp4.dequantize(b2[e], s2[e], torch.float32).T + bias2[e])
    return dict(mlp1=(b1, s1, bias1), mlp2=(b2, s2, bias2), chosen=chosen, weights=weights, t=t, x=x, h_in=h_in,
                h_ref=h_ref, y_ref=y_ref)


@pytest.mark.parametrize("experts", DECODE_EXPERTS)
@pytest.mark.parametrize("tiles", DECODE_TILES)
def test_moe_decode_projections_equal_dequantize_then_matmul(experts, tiles, device, monkeypatch):
    """mlp1 (gate/linear rows, bias, clamped SwiGLU) per (token, slot) and mlp2 (bias, routing weight, sum over slots,
    residual) per token against dequantised fp32 matmuls of the same bf16-rounded activations."""
    from ossrun.model.kernels import triton_moe_decode

    if tiles:
        monkeypatch.setenv("OSSRUN_MOE_DECODE_TILES", tiles)
    case = decode_case(experts, len(experts) + (tiles is None))
    to = lambda *ts: [v.to(device) for v in ts]  # noqa: E731
    h = triton_moe_decode.mlp1(*to(case["t"], case["chosen"], *case["mlp1"]), 7.0)
    y = triton_moe_decode.mlp2(*to(case["h_in"], case["chosen"], case["weights"], *case["mlp2"], case["x"]))
    assert rel_err(h.cpu(), case["h_ref"]) < (1e-5 if device.type == "cpu" else 1e-4)
    assert rel_err(y.cpu() - case["x"], case["y_ref"] - case["x"]) < (1e-5 if device.type == "cpu" else 1e-4)


# ---------------------------------------------------------------- MoE for few tokens (swap-AB tensor-core kernels)

# (tile, second projection's K runs): the defaults; wide rows with a K tail, unsplit; 8 blocks an iteration with 4 runs
# of K (the 2-block K of the tests' second projection leaves two runs empty).
MMA_TILES = [(None, None), ("128,4,8,2", "1"), ("64,8,4,3", "4")]


def deinterleave(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a[:, 0::2], a[:, 1::2]], 1).contiguous()


def interleave(a: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(a)
    half = a.shape[1] // 2
    out[:, 0::2], out[:, 1::2] = a[:, :half], a[:, half:]
    return out


@pytest.mark.parametrize("experts", DECODE_EXPERTS)
@pytest.mark.parametrize("tiles", MMA_TILES)
def test_moe_mma_projections_equal_dequantize_then_matmul(experts, tiles, device, monkeypatch):
    """The swap-AB kernels: one program per (expert, row tile) serving every pair routed to it (the 3-token case puts
    three pairs in each of four experts, the 5-token one 32 columns), de-interleaved activations in and h out."""
    from ossrun.model.kernels import triton_moe_mma

    tile, split_k = tiles
    if tile:
        monkeypatch.setenv("OSSRUN_MOE_MMA_TILE", tile)
        monkeypatch.setenv("OSSRUN_MOE_MMA_SPLIT_K", split_k)
    case = decode_case(experts, len(experts) + (tile is None))
    to = lambda *ts: [v.to(device) for v in ts]  # noqa: E731
    h = triton_moe_mma.mlp1(*to(deinterleave(case["t"]), case["chosen"], *case["mlp1"]), 7.0)
    y = triton_moe_mma.mlp2(*to(deinterleave(case["h_in"]), case["chosen"], case["weights"], *case["mlp2"], case["x"]))
    # 2e-5 on the CPU: the lows' and highs' dot products are summed apart, a different order than the reference's.
    assert rel_err(interleave(h.cpu()), case["h_ref"]) < (2e-5 if device.type == "cpu" else 1e-4)
    assert rel_err(y.cpu() - case["x"], case["y_ref"] - case["x"]) < (1e-5 if device.type == "cpu" else 1e-4)


@pytest.mark.parametrize("tokens", [1, 3, 5])
def test_moe_mma_first_projection_routes_as_the_topk_kernel(tokens, device):
    """The first projection given the router logits: the experts and weights it writes equal `norm_route`'s top-k
    kernel's (ties included: logits rounded to 1/4 collide), and h equals the projection given those experts."""
    from ossrun.model.kernels import triton_moe_decode, triton_moe_mma

    case = decode_case([[0, 1, 2, 3]] * tokens, tokens)
    g = torch.Generator().manual_seed(tokens)
    logits = (torch.randn(tokens, 6, generator=g) * 4).round() / 4  # 6 experts, some equal logits
    experts_ref = torch.empty(tokens, 4, dtype=torch.int32)
    weights_ref = torch.empty(tokens, 4)
    to = lambda *ts: [v.to(device) for v in ts]  # noqa: E731
    logits_d, experts_ref_d, weights_ref_d = to(logits, experts_ref, weights_ref)
    triton_moe_decode._topk_kernel[(tokens,)](logits_d, experts_ref_d, weights_ref_d, E=6, E_P=8, K=4, K_P=4, PDL=False)
    experts, weights = to(torch.full((tokens, 4), -7, dtype=torch.int32), torch.zeros(tokens, 4))
    t = deinterleave(case["t"]).to(device)
    h = triton_moe_mma.mlp1(t, experts, *to(*case["mlp1"]), 7.0, route=(logits_d, weights))
    assert torch.equal(experts.cpu(), experts_ref_d.cpu())
    assert torch.equal(weights.cpu(), weights_ref_d.cpu())
    assert torch.equal(h.cpu(), triton_moe_mma.mlp1(t, experts_ref_d, *to(*case["mlp1"]), 7.0).cpu())


def _halves(word: int) -> tuple[int, int]:
    return word & 0xFFFF, word >> 16


@pytest.mark.parametrize("one_multiply", [False, True])
def test_bf16_decode_ptx_text_on_a_model_of_its_instructions(one_multiply):
    """The tensor-core kernels' PTX decoders, their text run on `tests/ptx_model.py` (the interpreter runs no PTX):
    every byte, low and high nibble, under extreme scale bytes, against `mxfp4.dequantize`, bit for bit."""
    from ossrun.model.kernels import triton_moe_mma
    from tests.ptx_model import run

    asm = (triton_moe_mma._E2M1_BF16_ONE_MULTIPLY_PTX if one_multiply else triton_moe_mma._E2M1_BF16_PTX).value
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 1, 16)  # byte 16r + j: row r, elements 2j (low) and 2j + 1 (high)
    for s in [2, 60, 120, 127, 128] + ([] if one_multiply else [129, 200, 240]):
        bits = ((s + 126) << 7) if one_multiply else (s << 7)  # what `_decode_bf16` hands the asm as the scale
        expected = mxfp4.dequantize(blocks, torch.full((16, 1), s, dtype=torch.uint8), torch.bfloat16).view(256, 2)
        for first in range(0, 256, 4):
            word = int.from_bytes(bytes(range(first, first + 4)), "little")
            lo01, lo23, hi01, hi23 = run(asm, {4: word, 5: bits | bits << 16, 6: bits | bits << 16}, 4)
            got = [*_halves(lo01), *_halves(lo23)], [*_halves(hi01), *_halves(hi23)]
            for nibble in (0, 1):
                want = [int(v) for v in expected[first:first + 4, nibble].view(torch.int16).tolist()]
                assert [g if g < 0x8000 else g - 0x10000 for g in got[nibble]] == want, (s, first, nibble)


def test_fp16_decode_ptx_text_of_the_gemv_kernels_on_a_model_of_its_instructions():
    """The GEMV kernels' PTX nibble decoder: each nibble's E2M1 value × 2^-14 as fp16, for every byte."""
    import struct

    from ossrun.model.kernels import triton_moe_decode
    from tests.ptx_model import run

    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    e2m1 = lambda n: (-1 if n & 8 else 1) * table[n & 7] * 2.0 ** -14  # noqa: E731
    as_fp16 = lambda h: struct.unpack("<e", struct.pack("<H", h))[0]  # noqa: E731
    for first in range(0, 256, 4):
        word = int.from_bytes(bytes(range(first, first + 4)), "little")
        lo01, lo23, hi01, hi23 = run(triton_moe_decode._E2M1_PTX.value, {4: word}, 4)
        lo = [as_fp16(h) for h in (*_halves(lo01), *_halves(lo23))]
        hi = [as_fp16(h) for h in (*_halves(hi01), *_halves(hi23))]
        assert lo == [e2m1(b & 15) for b in range(first, first + 4)]
        assert hi == [e2m1(b >> 4) for b in range(first, first + 4)]


@pytest.mark.parametrize("scale_bytes, small_scales", [
    ([2, 3, 100, 127, 128, 140, 200, 127, 126, 5, 60, 127, 127, 150, 90, 240], False),  # 2^-125 … 2^113: two multiplies
    ([2, 3, 100, 127, 128, 120, 4, 127, 126, 5, 60, 127, 127, 110, 90, 2], True),  # all ≤ 128: the one-multiply decode
])
def test_moe_mma_decode_is_exact_for_every_nibble_and_extreme_scales(scale_bytes, small_scales, device):
    """Identity activations through the second projection read the decoded weights back, exactly: every byte (both
    nibbles of every code) under extreme scale bytes. 32 tokens of one expert: 32 columns of one program.
    On a GPU this checks the PTX decodes (their bf16 subnormal steps included); the interpreter checks the fp32 route."""
    from ossrun.model.kernels import triton_moe_mma

    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 1, 16)
    scales = torch.tensor(scale_bytes, dtype=torch.uint8).view(1, 16, 1)
    h = deinterleave(torch.eye(32))
    experts = torch.zeros(32, 1, dtype=torch.int32)
    ones = torch.ones(32, 1)
    y = triton_moe_mma.mlp2(h.to(device), experts.to(device), ones.to(device), blocks.to(device), scales.to(device), None,
                            residual=torch.zeros(32, 16, device=device), small_scales=small_scales)
    assert torch.equal(y.cpu(), mxfp4.dequantize(blocks[0], scales[0], torch.float32).T)


@pytest.mark.parametrize("tile", [None, "1,4", "8,8"])
def test_moe_decode_norm_and_routing_equal_reference(tile, device, monkeypatch):
    """RMSNorm, router logits (1, 4 or 8 experts a program), top-4 of 32 and the softmax over the four."""
    from ossrun.model.gpt_oss import RMSNorm
    from ossrun.model.kernels.triton_moe_decode import norm_route

    if tile:
        monkeypatch.setenv("OSSRUN_MOE_ROUTER_TILE", tile)
    g = torch.Generator().manual_seed(13)
    hidden = 200  # not a multiple of the 128-wide chunk
    x = 3 * torch.randn(6, hidden, generator=g)
    scale = 1 + 0.1 * torch.randn(hidden, generator=g)
    gate, gate_bias = torch.randn(32, hidden, generator=g) / 10, torch.randn(32, generator=g)
    t, experts, weights = norm_route(x.to(device), scale.to(device), 1e-5, gate.to(device), gate_bias.to(device), 4)
    t_ref = RMSNorm(scale, 1e-5, torch.device("cpu"))(x)
    top = torch.topk(torch.nn.functional.linear(t_ref, gate, gate_bias), 4, dim=-1, sorted=True)
    assert rel_err(t.cpu(), t_ref) < 1e-6
    assert torch.equal(experts.cpu().long(), top.indices)
    assert rel_err(weights.cpu(), torch.softmax(top.values, dim=-1)) < 1e-5


# ---------------------------------------------------------------- dense GEMV (few rows)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("tile", [None, "8,64,2"])
def test_gemv_equals_linear_with_bias_residual_and_upcast(rows, tile, device, monkeypatch):
    """N and K not multiples of the tiles; fp32 operands (the interpreter's bf16 truncates where the GPU rounds)."""
    from ossrun.model.kernels.triton_gemv import gemv

    if tile:
        monkeypatch.setenv("OSSRUN_GEMV_TILE", tile)
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 300, generator=g), torch.randn(70, 300, generator=g), torch.randn(70, generator=g)
    residual = torch.randn(rows, 70, generator=g)
    ref = torch.nn.functional.linear(x, w, b)
    tol = 1e-5 if device.type == "cpu" else 1e-4
    assert rel_err(gemv(x.to(device), w.to(device), b.to(device)).cpu(), ref) < tol
    assert rel_err(gemv(x.to(device), w.to(device), b.to(device), residual=residual.to(device)).cpu(), ref + residual) < tol
    plain = gemv(x.to(device), w.to(device), None, torch.float64)
    assert plain.dtype == torch.float64 and rel_err(plain.cpu(), ref - b) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_with_the_rmsnorm_fused_equals_norm_then_linear(dtype, device):
    """The RMSNorm taken into the projection (OSSRUN_GEMV_FUSE_NORM): the norm's fp32 arithmetic, rounded to the
    activations' dtype where `rms_norm` rounds, then the projection; K = 300 is not a multiple of the chunk."""
    from ossrun.model.kernels.triton_fused import rms_norm
    from ossrun.model.kernels.triton_gemv import gemv

    g = torch.Generator().manual_seed(7)
    x, w, b = 3 * torch.randn(2, 300, generator=g), torch.randn(70, 300, generator=g), torch.randn(70, generator=g)
    scale = 1 + 0.1 * torch.randn(300, generator=g)
    x, w, b = (v.to(dtype).to(device) for v in (x, w, b))
    fused = gemv(x, w, b, norm=(scale.to(device), 1e-5))
    separate = gemv(rms_norm(x, scale.to(device), 1e-5), w, b)
    assert fused.dtype == dtype
    assert rel_err(fused.cpu(), separate.cpu()) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("tokens", [1, 3])  # the GEMV (one row), then the layer's own matmul
@pytest.mark.parametrize("fused", ["0", "1"])
def test_attention_block_with_triton_projections_equals_the_reference(tokens, fused, checkpoints, device, monkeypatch):
    """The tiny model's attention block on its CUDA-path projections (`kernels.gpu.linear`: the qkv GEMV with the
    RMSNorm fused or before it, the out GEMV with the residual) against the PyTorch reference, in fp32."""
    from ossrun.model.attention import DenseAttention
    from ossrun.model.checkpoint import load_checkpoint
    from ossrun.model.gpt_oss import GptOss

    monkeypatch.setenv("OSSRUN_GEMV_FUSE_NORM", fused)
    model = GptOss.from_checkpoint(load_checkpoint(checkpoints["hf"]), torch.float32, device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, model.config.hidden_size, generator=g).to(device)
    positions = torch.arange(tokens, device=device)
    backend = DenseAttention(torch.zeros(tokens, dtype=torch.long, device=device), positions)
    attn = model.blocks[0].attn
    attn.triton = False
    ref = attn(x, model.rotary.cos_sin(positions), backend)
    attn.triton = True
    out = attn(x, model.rotary.cos_sin(positions), backend)
    assert rel_err(out.cpu(), ref.cpu()) < 1e-5


# ---------------------------------------------------------------- paged attention with sinks


def build_step(seqs, page, n_kv, dim, n_heads, window, dtype, device, n_blocks=64, seed=0):
    """A step of the engine: seqs = [(cached tokens, new tokens)] → q, k, v, caches and a PagedAttention."""
    g = torch.Generator().manual_seed(seed)
    free = (torch.randperm(n_blocks - 1, generator=g) + 1).tolist()  # block 0 is the null block
    tokens = sum(n for _, n in seqs)
    q = torch.randn(tokens, n_heads, dim, generator=g)
    k = torch.randn(tokens, n_kv, dim, generator=g)
    v = torch.randn(tokens, n_kv, dim, generator=g)
    # Keys already cached are random too (what earlier steps wrote); the step writes its own.
    k_cache = torch.randn(n_blocks, page, n_kv, dim, generator=g)
    v_cache = torch.randn(n_blocks, page, n_kv, dim, generator=g)
    starts, lens, positions, slots, tables, firsts, context = [], [], [], [], [], [], []
    for cached, n in seqs:
        end = cached + n
        table = [free.pop() for _ in range((end - 1) // page + 1)]
        starts.append(len(positions))
        lens.append(n)
        positions.extend(range(cached, end))
        slots.extend(table[p // page] * page + p % page for p in range(cached, end))
        first = max(0, cached - window + 1) // page if window else 0
        tables.append(table[first:])
        firsts.append(first)
        context.append(end)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    group = PagedGroup(as_long(slots), as_long(padded), as_long(firsts), as_long(context))

    def attention(use_triton: bool):
        caches = [(k_cache.to(device=device, dtype=dtype), v_cache.to(device=device, dtype=dtype))]
        paged = PagedAttention(caches, page, {"full": group, "sliding": group}, starts, lens, as_long(positions), triton=use_triton)
        paged.prepare()
        return paged

    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(q), to(k), to(v), attention


STEPS = {
    "decode": [(5, 1), (40, 1), (0, 1), (17, 1)],
    "prefill": [(0, 23), (0, 5), (0, 40)],
    "chunked_prefill_over_cached_prefix": [(37, 20), (16, 16), (3, 1)],
    "mixed_step": [(9, 1), (0, 30), (50, 1), (21, 12)],
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("splits", [None, "4"])
def test_paged_attention_equals_reference(step, window, splits, device, monkeypatch):
    """Sequences longer than the window (8) in every step; page 4 so tables span many blocks. With `splits` the decodes
    take the split-key kernels (runs of 64 keys: the 40-token context fills one run, the others stay empty)."""
    if splits:
        monkeypatch.setenv("OSSRUN_ATTN_DECODE_SPLITS", splits)
    n_heads, n_kv, dim = 8, 2, 16
    q, k, v, attention = build_step(STEPS[step], 4, n_kv, dim, n_heads, window, torch.float32, device)
    sinks = torch.randn(n_heads, device=device)
    ref = attention(False)(0, q, k, v, sinks, window, dim ** -0.5)
    out = attention(True)(0, q, k, v, sinks, window, dim ** -0.5)
    assert rel_err(out.cpu(), ref.cpu()) < 1e-5


@pytest.mark.parametrize("splits", [None, "2"])
def test_sinks_that_take_most_of_the_weight(splits, device, monkeypatch):
    if splits:
        monkeypatch.setenv("OSSRUN_ATTN_DECODE_SPLITS", splits)
    n_heads, n_kv, dim = 8, 2, 16
    q, k, v, attention = build_step(STEPS["mixed_step"], 4, n_kv, dim, n_heads, 8, torch.float32, device, seed=5)
    sinks = torch.full((n_heads,), 12.0, device=device)  # e^12 against scores of order 1: outputs shrink ~1e5
    ref = attention(False)(0, q, k, v, sinks, 8, dim ** -0.5)
    out = attention(True)(0, q, k, v, sinks, 8, dim ** -0.5)
    assert float(ref.abs().max()) < 1e-3
    assert rel_err(out.cpu(), ref.cpu()) < 1e-5


@pytest.mark.parametrize("splits", [None, "4"])
def test_gpt_oss_head_shapes_in_bf16(splits, device, monkeypatch):
    """64 query heads on 8 KV heads of 64 dims (the 20b layout), page 16, window 128, bf16 cache; with `splits` the
    decodes' keys (300 and 151 of them, 128 in the window) are split into 4 runs of 64 or 128 (some empty)."""
    if splits:
        monkeypatch.setenv("OSSRUN_ATTN_DECODE_SPLITS", splits)
    n_heads, n_kv, dim = 64, 8, 64
    seqs = [(150, 1), (0, 20), (130, 9), (299, 1)]
    q, k, v, attention = build_step(seqs, 16, n_kv, dim, n_heads, 128, torch.bfloat16, device, n_blocks=64)
    sinks = torch.randn(n_heads, device=device)
    ref = attention(False)(0, q, k, v, sinks, 128, dim ** -0.5)
    out = attention(True)(0, q, k, v, sinks, 128, dim ** -0.5)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.cpu(), ref.cpu()) < 2e-2


# ---------------------------------------------------------------- a whole MoE layer


@pytest.mark.parametrize("tokens, kind", [(1, "gemv"), (5, "gemv"), (1, "mma"), (5, "mma"), (37, "gemv")])
def test_moe_layer_through_triton_equals_the_reference(tokens, kind, checkpoints, device, monkeypatch):
    """The tiny model's MoE layers: norm, routing, grouping, both projections, SwiGLU, the weighted sum and the residual.
    Up to DECODE_MAX_TOKENS tokens the few-token kernels of `kind` (GEMV or swap-AB tensor-core), then the grouped one."""
    from ossrun.model.checkpoint import load_checkpoint
    from ossrun.model.gpt_oss import GptOss

    monkeypatch.setenv("OSSRUN_MOE_DECODE_KIND", kind)

    model = GptOss.from_checkpoint(load_checkpoint(checkpoints["hf"]), torch.float32, device)
    x = torch.randn(tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(11)).to(device)
    for block in model.blocks[:2]:
        moe = block.mlp
        moe.use_kernel, moe.use_triton = False, False
        ref = moe(x)
        moe.use_triton = True
        out = moe(x)
        # The kernel rounds activations (and the hidden SwiGLU output) to bf16; the reference stays fp32.
        assert rel_err((out - x).cpu(), (ref - x).cpu()) < 1e-2


def test_a_layer_with_scale_bytes_the_kernels_cannot_decode_runs_the_reference(checkpoints, caplog):
    """The kernels build a block's scale as an fp32 exponent field of s + 14: scale byte 241 decoded to NaN, 242+ to
    sign-flipped garbage (hunt_kernels #1). Such a layer now keeps the PyTorch path, said in the log."""
    from ossrun.model.checkpoint import load_checkpoint
    from ossrun.model.gpt_oss import GptOss

    moe = GptOss.from_checkpoint(load_checkpoint(checkpoints["hf"]), torch.float32).blocks[0].mlp
    assert moe._triton_decodes_scales(0)  # the tiny checkpoint's bytes are in range
    for byte in (241, 254, 1):
        saved = int(moe.mlp2_scales[0, 0, 0])
        moe.mlp2_scales[0, 0, 0] = byte
        assert not moe._triton_decodes_scales(0)
        moe.mlp2_scales[0, 0, 0] = saved
    assert "run the PyTorch path" in caplog.text


@pytest.mark.parametrize("name, value, ok", [("OSSRUN_ATTN_DECODE_SPLITS", "3", False), ("OSSRUN_ATTN_DECODE_SPLITS", "0", False),
                                             ("OSSRUN_ATTN_DECODE_SPLITS", "x", False), ("OSSRUN_ATTN_DECODE_SPLITS", "8", True),
                                             ("OSSRUN_ATTN_DECODE_BLOCK_N", "8", False), ("OSSRUN_ATTN_DECODE_BLOCK_N", "96", False),
                                             ("OSSRUN_ATTN_DECODE_BLOCK_N", "64", True)])
def test_attention_settings_the_kernels_cannot_take_are_refused_with_their_name(monkeypatch, name, value, ok):
    """A split count or key block that is not a power of two failed inside Triton at the first decode step (`arange's
    range must be a power of 2`; a block under 16 does not compile for tl.dot on a GPU): hunt_kernels #3."""
    from ossrun.model.kernels.triton_attention import decode_block_n, decode_splits

    monkeypatch.setenv(name, value)
    read = (lambda: decode_splits(8)) if name.endswith("SPLITS") else decode_block_n
    if ok:
        assert read() == int(value)
    else:
        with pytest.raises(ValueError, match=name):
            read()


def test_engine_with_triton_attention_generates_the_reference_tokens(checkpoints, device):
    """Through the engine, with the Triton attention and RoPE/cache-write kernels: chunked
    prefill (24-token steps) of prompts longer than the window (16 here, to keep the interpreter quick),
    a shared prefix from the cache, and batched decodes, all in fp32 (none of these kernels rounds)."""
    from ossrun.engine.engine import Engine, EngineOptions
    from ossrun.engine.request import Request, SamplingParams
    from ossrun.model.checkpoint import load_checkpoint
    from ossrun.model.gpt_oss import GptOss

    checkpoint = load_checkpoint(checkpoints["small_vocab_hf"])
    model = GptOss(checkpoint.config.replace(sliding_window=16), checkpoint.tensors, torch.float32, device)
    g = torch.Generator().manual_seed(2)
    shared = torch.randint(0, 1024, (16,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 1024, (n,), generator=g).tolist() for n in (30, 3)]

    def generate(use_triton: bool) -> list[list[int]]:
        options = EngineOptions(kv_dtype=torch.float32, max_tokens_per_step=24, kv_cache_bytes=8 * 1024**2, max_model_len=128)
        engine = Engine(model, options)
        engine.runner.triton_attention = use_triton  # not the MoE kernel: it rounds to bf16
        for block in model.blocks:  # RoPE and the cache writes fused (norms: their own test, the interpreter is slow)
            block.attn.triton = use_triton
        requests = [Request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0)) for i, p in enumerate(prompts)]
        events = engine.generate(requests)
        return [[e.token_id for e in events[r.request_id] if e.token_id is not None] for r in requests]

    assert generate(True) == generate(False)


def test_cuda_graph_decode_steps_equal_eager_steps(checkpoints, device):
    """Decode steps replayed from CUDA graphs (padded batches, tables as wide as the context allows) give the tokens the
    same kernels give launched one by one; requests finish at different lengths so the batch shrinks.
    On the CPU the "graphs" run the same forward over the same padded static buffers, uncaptured."""
    from ossrun.engine.cuda_graphs import DecodeGraphs
    from ossrun.engine.engine import Engine, EngineOptions
    from ossrun.engine.request import Request, SamplingParams
    from ossrun.model.checkpoint import load_checkpoint
    from ossrun.model.gpt_oss import GptOss

    checkpoint = load_checkpoint(checkpoints["small_vocab_hf"])
    model = GptOss(checkpoint.config.replace(sliding_window=16), checkpoint.tensors, torch.float32, device, "fast")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (5, 40, 20)]

    def generate(graphs: bool) -> tuple[list[list[int]], int]:
        options = EngineOptions(kv_dtype=torch.float32, max_tokens_per_step=24, kv_cache_bytes=8 * 1024**2, max_model_len=128,
                                cuda_graphs=graphs)
        engine = Engine(model, options)
        runner = engine.runner
        runner.triton_attention = True  # on the CPU: the interpreter
        if graphs and runner.graphs is None:
            runner.graphs = DecodeGraphs(model, runner.caches, engine.kv.block_size, options.max_num_seqs, engine.max_model_len)
        requests = [Request(f"r{i}", p, SamplingParams(max_tokens=3 + 2 * i, temperature=0)) for i, p in enumerate(prompts)]
        events = engine.generate(requests)
        captured = len(engine.runner.graphs.graphs) if engine.runner.graphs is not None else 0
        return [[e.token_id for e in events[r.request_id] if e.token_id is not None] for r in requests], captured

    with_graphs, captured = generate(True)
    without, _ = generate(False)
    assert captured >= 2  # several batch sizes were replayed (on the CPU they are made on first use)
    assert with_graphs == without


def test_kernels_compile_for_hopper():
    """Triton's compiler (not the interpreter) accepts every configuration, for sm_90, without a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(root / "tests" / "triton_sm90_compile.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("shared") == 84


# ---------------------------------------------------------------- fused small operations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_reference(dtype, device):
    from ossrun.model.gpt_oss import RMSNorm
    from ossrun.model.kernels.triton_fused import rms_norm

    g = torch.Generator().manual_seed(6)
    scale = 1 + 0.1 * torch.randn(80, generator=g)  # a width that is not a power of two
    x = (3 * torch.randn(7, 80, generator=g)).to(device=device, dtype=dtype)
    ref = RMSNorm(scale, 1e-5, device)(x)
    out = rms_norm(x, scale.to(device), 1e-5)
    assert out.dtype == dtype
    assert rel_err(out.cpu(), ref.cpu()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_rope_and_cache_write_equal_reference(device):
    """q rotated as Rotary.apply rotates it; k rotated and v copied into exactly their slots; nothing else written."""
    from ossrun.model.config import PRESETS
    from ossrun.model.gpt_oss import Rotary
    from ossrun.model.kernels.triton_fused import rope_and_cache

    config = PRESETS["20b"].replace(num_attention_heads=12, num_key_value_heads=3, head_dim=32)  # Hq, Hkv not powers of two
    rotary = Rotary(config, device)
    g = torch.Generator().manual_seed(8)
    tokens, page, blocks = 9, 4, 6
    qkv = torch.randn(tokens, (12 + 2 * 3) * 32, generator=g).to(device)
    positions = torch.tensor([0, 1, 2, 50, 51, 7000, 3, 4, 90000], device=device)
    slots = torch.randperm(blocks * page, generator=g)[:tokens].to(device)
    k_cache = torch.full((blocks, page, 3, 32), float("nan"), device=device)
    v_cache = torch.full((blocks, page, 3, 32), float("nan"), device=device)
    cos, sin = rotary.cos_sin(positions)
    q = rope_and_cache(qkv, cos, sin, slots, k_cache, v_cache, 12)
    q_ref, k_ref, v_ref = qkv.split([12 * 32, 3 * 32, 3 * 32], dim=-1)
    assert rel_err(q.cpu(), Rotary.apply(q_ref.view(tokens, 12, 32), cos, sin).cpu()) < 1e-6
    k_flat, v_flat = k_cache.view(-1, 3, 32), v_cache.view(-1, 3, 32)
    assert rel_err(k_flat[slots].cpu(), Rotary.apply(k_ref.reshape(tokens, 3, 32), cos, sin).cpu()) < 1e-6
    assert torch.equal(v_flat[slots].cpu(), v_ref.reshape(tokens, 3, 32).cpu())
    untouched = torch.ones(blocks * page, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert torch.isnan(k_flat[untouched]).all() and torch.isnan(v_flat[untouched]).all()


def test_routing_equals_topk_then_softmax(device):
    """Top-4 of 32 experts, softmax over the four, counts per expert, and the pairs grouped by expert."""
    from ossrun.model.kernels.triton_moe import route

    logits = torch.randn(45, 32, generator=torch.Generator().manual_seed(12)).to(device)
    experts, weights, counts, order = route(logits, 4)
    top = torch.topk(logits, 4, dim=-1, sorted=True)
    assert torch.equal(experts.cpu(), top.indices.cpu())
    assert rel_err(weights.cpu(), torch.softmax(top.values, dim=-1).cpu()) < 1e-6
    assert torch.equal(counts.cpu().long(), torch.bincount(top.indices.reshape(-1).cpu(), minlength=32))
    assert torch.equal(order.sort().values.cpu(), torch.arange(45 * 4))  # a permutation of the pairs
    grouped = experts.reshape(-1)[order].cpu()
    assert torch.equal(grouped, grouped.sort().values)  # sorted by expert
