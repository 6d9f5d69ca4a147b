"""MXFP4 decoding, checked bit for bit against an independent decode written from the format's definition."""

import math
import struct

import pytest
import torch

from ossrun.model import mxfp4


def decode_e2m1(code: int) -> float:
    """E2M1 from its bit fields: sign, 2-bit exponent (bias 1), 1-bit mantissa; exponent 0 is subnormal."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent = (code >> 1) & 0b11
    mantissa = code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
    return sign * magnitude


def reference_decode(blocks: list[list[int]], scales: list[int]) -> list[float]:
    out = []
    for block, scale in zip(blocks, scales):
        for byte in block:
            for code in (byte & 0x0F, byte >> 4):  # low nibble is the even element
                out.append(math.ldexp(decode_e2m1(code), scale - 127))
    return out


def bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


@pytest.mark.parametrize("scale", [0, 1, 50, 100, 118, 122, 126, 127, 128, 140, 200, 250])  # 251+ overflows fp32 for |v| ≥ 2
def test_every_byte_value_at_many_scales(scale):
    all_bytes = list(range(256))
    blocks = [all_bytes[i:i + 16] for i in range(0, 256, 16)]  # 16 blocks of 16 bytes
    scales = [scale] * len(blocks)
    got = mxfp4.dequantize(torch.tensor(blocks, dtype=torch.uint8), torch.tensor(scales, dtype=torch.uint8), torch.float32)
    expected = reference_decode(blocks, scales)
    assert got.shape == (16 * 32,)
    assert [bits(v) for v in got.tolist()] == [bits(v) for v in expected]  # bit-exact, signed zeros included


def test_mixed_scales_and_bf16_are_exact():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (3, 5), dtype=torch.uint8, generator=g)
    fp32 = mxfp4.dequantize(blocks, scales, torch.float32)
    bf16 = mxfp4.dequantize(blocks, scales, torch.bfloat16)
    expected = torch.tensor([reference_decode(b.tolist(), s.tolist()) for b, s in zip(blocks, scales)])
    assert fp32.shape == (3, 5 * 32)
    assert torch.equal(fp32, expected)
    assert torch.equal(bf16.float(), expected)  # every FP4 value × 2^k fits bf16 exactly


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8))
