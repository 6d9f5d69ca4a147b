"""MXFP4: 4-bit E2M1 values in blocks of 32 along the input dimension, one E8M0 scale byte per block.

The experts stay packed in memory (4.25 bits a weight); `dequantize` expands only the experts a
step routes to, so the full 20b MoE never exists in bf16 (~36 GiB) at once.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK_SIZE = 32
BYTES_PER_BLOCK = 16
SCALE_BIAS = 127

_byte_tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-byte lookups in `dtype`: the two FP4 values a byte holds (low nibble first) and 2^(byte-127).

    Both are exact in bf16 and fp32 (powers of two down to the subnormals, 2^-127 included), so
    decoding straight into the compute dtype loses nothing and moves half the bytes of an fp32 detour.
    """
    key = (device, dtype)
    if key not in _byte_tables:
        fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
        codes = torch.arange(256)
        pairs = torch.stack([fp4[codes & 0x0F], fp4[codes >> 4]], dim=-1)  # [256, 2]
        powers = torch.ldexp(torch.ones(256, dtype=torch.float64), codes.to(torch.float64) - SCALE_BIAS)
        _byte_tables[key] = (pairs.to(device=device, dtype=dtype), powers.to(device=device, dtype=dtype))
    return _byte_tables[key]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Packed `blocks` [..., n_blocks, 16] (uint8) and `scales` [..., n_blocks] (uint8) → [..., n_blocks * 32].

    Exact: every FP4 value times a power of two is representable in bf16 and fp32 (scale bytes
    0..254; 255 is E8M0's NaN and decodes to inf here; 251+ overflow fp32 for |values| ≥ 2).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError("MXFP4 blocks and scales are uint8")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    table_dtype = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
    pairs, powers = _tables(blocks.device, table_dtype)
    # index_select with int32 indices: several times faster on CPU than advanced indexing with int64.
    values = pairs.index_select(0, blocks.reshape(-1).int()).view(*scales.shape, BLOCK_SIZE)
    values.mul_(powers.index_select(0, scales.reshape(-1).int()).view(*scales.shape, 1))
    return values.view(*scales.shape[:-1], scales.shape[-1] * BLOCK_SIZE).to(dtype)


def quantize_random(
    shape_out: int, shape_in: int, n_matrices: int, generator: torch.Generator, scale_bytes: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed weights [n, out, in/32, 16] with scale bytes drawn from `scale_bytes`.

    Used by the random checkpoints: the scale range decides how large activations get, which is
    how the `20b` preset makes the SwiGLU clamps fire.
    """
    n_blocks = shape_in // BLOCK_SIZE
    blocks = torch.randint(0, 256, (n_matrices, shape_out, n_blocks, BYTES_PER_BLOCK), dtype=torch.uint8, generator=generator)
    choice = torch.tensor(scale_bytes, dtype=torch.uint8)
    scales = choice[torch.randint(0, len(scale_bytes), (n_matrices, shape_out, n_blocks), generator=generator)]
    return blocks, scales


def _scale_exponents(weights: torch.Tensor) -> torch.Tensor:
    """Per 32-value block, the smallest power of two that brings the block's largest |value| to ≤ 6
    (FP4's largest), so nothing is clipped. weights [..., n·32] float → exponents [..., n] (int)."""
    blocks = weights.float().reshape(*weights.shape[:-1], -1, BLOCK_SIZE)
    amax = blocks.abs().amax(dim=-1).clamp(min=2.0 ** -120)
    return torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 127).int()


def _nearest_codes(scaled: torch.Tensor) -> torch.Tensor:
    """FP4 code (0..15) of the representable value nearest to each `scaled` value (|scaled| ≤ 6)."""
    magnitudes = torch.tensor(FP4_VALUES[:8])
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    codes = torch.bucketize(scaled.abs(), midpoints)
    return torch.where(scaled < 0, codes + 8, codes)


def round_to_mxfp4(weights: torch.Tensor) -> torch.Tensor:
    """`weights` [..., n·32] rounded to the nearest MXFP4 values (float32), as `quantize` stores them.

    Quantisation-aware training uses this in the forward: it is `dequantize(*quantize(w))` without packing.
    """
    exponents = _scale_exponents(weights)
    blocks = weights.float().reshape(*weights.shape[:-1], -1, BLOCK_SIZE)
    powers = torch.exp2(exponents.float()).unsqueeze(-1)
    values = torch.tensor(FP4_VALUES)[_nearest_codes(blocks / powers)] * powers
    return values.reshape(weights.shape)


def quantize(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weights` [..., n·32] → packed (blocks [..., n, 16], scales [..., n]) in the checkpoint layout:
    low nibble first, E8M0 scale bytes. Round to nearest; `dequantize` of the result is `round_to_mxfp4`."""
    if weights.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"the last dimension ({weights.shape[-1]}) must be a multiple of {BLOCK_SIZE}")
    exponents = _scale_exponents(weights)
    blocks = weights.float().reshape(*weights.shape[:-1], -1, BLOCK_SIZE)
    codes = _nearest_codes(blocks / torch.exp2(exponents.float()).unsqueeze(-1)).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exponents + SCALE_BIAS).to(torch.uint8)
