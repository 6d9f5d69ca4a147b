"""The GGUF converter of the llama.cpp benchmark (bench/gguf_convert.py): the parts a wrong guess would break silently.

Needs the `bench` extra's `gguf` package (skipped without it). The end-to-end check, llama.cpp's
logits on the converted bf16 file against ossrun's exact path, is the fidelity row of
`bench/vs_llamacpp.py` (it needs llama.cpp itself).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from bench.gguf_convert import _merge_parts, mxfp4_to_ggml  # noqa: E402
from ossrun.harmony import tokenizer  # noqa: E402
from ossrun.model import mxfp4  # noqa: E402


def test_mxfp4_blocks_decode_to_the_same_values_in_ggml_layout():
    """gguf's own MXFP4 decoder (llama.cpp's reference layout) reads exactly ossrun's values, every nibble and scale."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 6, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 6, 4), dtype=torch.uint8, generator=g)
    for rows in (slice(None), slice(0, None, 2), slice(1, None, 2)):  # whole, and the gate/up halves of mlp1
        expected = mxfp4.dequantize(blocks[:, rows], scales[:, rows], torch.float32).numpy()
        ggml = mxfp4_to_ggml(blocks[:, rows], scales[:, rows])
        assert ggml.shape == (*expected.shape[:-1], expected.shape[-1] // 32 * 17)
        decoded = gguf.quants.dequantize(ggml, gguf.GGMLQuantizationType.MXFP4).reshape(expected.shape)
        np.testing.assert_array_equal(decoded, expected)


def test_every_nibble_position_lands_where_ggml_expects_it():
    """One nonzero code at each of the 32 positions of a block: a swapped nibble order would move it."""
    for position in range(32):
        codes = torch.zeros(32, dtype=torch.uint8)
        codes[position] = 0x7  # 6.0
        blocks = (codes[0::2] | (codes[1::2] << 4)).view(1, 1, 1, 16)
        scales = torch.full((1, 1, 1), mxfp4.SCALE_BIAS, dtype=torch.uint8)
        decoded = gguf.quants.dequantize(mxfp4_to_ggml(blocks, scales), gguf.GGMLQuantizationType.MXFP4).reshape(32)
        assert decoded[position] == 6.0 and np.count_nonzero(decoded) == 1


def test_merges_rebuild_each_token_from_two_lower_ranked_tokens():
    """The merge that makes a tiktoken token: two tokens of lower rank whose bytes concatenate to it."""
    pieces = [tokenizer.token_bytes(i) for i in range(tokenizer.ENDOFTEXT - 1)]
    ranks = {piece: i for i, piece in enumerate(pieces)}
    for token_id in [256, 300, 1000, 5000, 50_000, 120_000, 199_997]:
        left, right = _merge_parts(ranks, pieces[token_id], token_id)
        assert left + right == pieces[token_id]
        assert ranks[left] < token_id and ranks[right] < token_id
