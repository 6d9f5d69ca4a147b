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

from bench.gguf_convert import _merge_parts, mxfp4_to_ggml, tensor_plan  # noqa: E402
from ossrun.harmony import tokenizer  # noqa: E402
from ossrun.model import mxfp4  # noqa: E402
from ossrun.model.checkpoint import load_checkpoint  # noqa: E402


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


def _decoded(planned) -> np.ndarray:
    data = planned.make()
    if planned.qtype == gguf.GGMLQuantizationType.F32:
        return data
    return gguf.quants.dequantize(data.reshape(planned.byte_shape), planned.qtype)


def _expected(w: dict, config, name: str) -> torch.Tensor:
    """What each GGUF tensor must hold, written from the checkpoint independently of the converter."""
    q, kv = config.q_size, config.kv_size
    if name in ("token_embd.weight", "output.weight", "output_norm.weight"):
        return w[{"token_embd.weight": "embedding.weight", "output.weight": "unembedding.weight", "output_norm.weight": "norm.scale"}[name]]
    layer, rest = name.split(".", 2)[1:]
    p = f"block.{layer}."
    qkv = {"attn_q": slice(0, q), "attn_k": slice(q, q + kv), "attn_v": slice(q + kv, q + 2 * kv)}
    kind = rest.split(".")[0]
    if kind in qkv:
        return w[p + "attn.qkv." + rest.split(".")[1]][qkv[kind]]
    if kind in ("ffn_gate_exps", "ffn_up_exps"):
        rows = slice(0, None, 2) if kind == "ffn_gate_exps" else slice(1, None, 2)
        if rest.endswith("bias"):
            return w[p + "mlp.mlp1_bias"][:, rows]
        return mxfp4.dequantize(w[p + "mlp.mlp1_weight.blocks"][:, rows], w[p + "mlp.mlp1_weight.scales"][:, rows], torch.float32)
    if kind == "ffn_down_exps":
        if rest.endswith("bias"):
            return w[p + "mlp.mlp2_bias"]
        return mxfp4.dequantize(w[p + "mlp.mlp2_weight.blocks"], w[p + "mlp.mlp2_weight.scales"], torch.float32)
    simple = {"attn_norm.weight": "attn.norm.scale", "attn_output.weight": "attn.out.weight", "attn_output.bias": "attn.out.bias",
              "attn_sinks.weight": "attn.sinks", "post_attention_norm.weight": "mlp.norm.scale",
              "ffn_gate_inp.weight": "mlp.gate.weight", "ffn_gate_inp.bias": "mlp.gate.bias"}
    return w[p + simple[rest]]


def test_bf16_plan_holds_every_checkpoint_tensor_bit_for_bit(checkpoints):
    """Every tensor of the bf16 layout, decoded as llama.cpp would, equals its checkpoint tensor exactly.

    Caught a real bug: lambdas made in the per-layer loop read the last layer's q/k/v when evaluated.
    """
    ckpt = load_checkpoint(checkpoints["small_vocab_original"])
    plan = tensor_plan(ckpt, "bf16")
    assert len(plan) == 3 + 19 * ckpt.config.num_hidden_layers
    for planned in plan:
        expected = _expected(ckpt.tensors, ckpt.config, planned.name).float().numpy()
        np.testing.assert_array_equal(_decoded(planned).reshape(expected.shape), expected, err_msg=planned.name)


def test_q8_0_plan_is_within_its_rounding_bound_of_the_checkpoint(checkpoints):
    """Q8_0 rounds each value to q·d with d = amax/127 and |q| ≤ 127, then stores d in fp16 (relative error
    ≤ 2^-11): each value is within d/2 + 127·d·2^-11 of the checkpoint's."""
    ckpt = load_checkpoint(checkpoints["small_vocab_original"])
    for planned in tensor_plan(ckpt, "q8_0"):
        expected = _expected(ckpt.tensors, ckpt.config, planned.name).float().numpy()
        got = _decoded(planned).reshape(expected.shape)
        if planned.qtype != gguf.GGMLQuantizationType.Q8_0:
            np.testing.assert_array_equal(got, expected, err_msg=planned.name)
            continue
        blocks = expected.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2**-11) * (1 + 1e-6)), planned.name
