"""An ossrun checkpoint → a GGUF file in llama.cpp's gpt-oss layout, so both engines run the same weights.

    PYTHONPATH=. python bench/gguf_convert.py --model DIR --out-dir DIR [--dense q8_0 bf16]

Benchmark code (needs the `bench` extra: `gguf`), not part of the server. The layout is the one
llama.cpp's own `convert_hf_to_gguf.py` writes for `GptOssForCausalLM` (read there, not copied):

- experts stay MXFP4, repacked into GGML blocks (1 scale byte, then 16 nibble bytes), the fused
  gate/up projection split into `ffn_gate_exps` (even rows) and `ffn_up_exps` (odd rows);
- attention q/k/v/o, token embedding and unembedding in the chosen dense type: `q8_0` is the
  published layout, `bf16` keeps the checkpoint's values exactly;
- norms, biases, sinks and the router stay float32, as llama.cpp's converter keeps them;
- the o200k_harmony tokenizer as a GPT-2-style byte-level BPE (tokens, types, merges) with the
  `gpt-4o` pre-tokenizer, rebuilt from the vocabulary ossrun ships (`ossrun.harmony.tokenizer`).

Caveat: llama.cpp hard-codes the SwiGLU constants (alpha 1.702, clamp 7.0), so a checkpoint with
another `swiglu_limit` is refused rather than silently computed differently.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from ossrun.harmony import tokenizer
from ossrun.model.checkpoint import Checkpoint, load_checkpoint
from ossrun.model.config import MAX_CONTEXT, ModelConfig

log = logging.getLogger(__name__)

ARCH = "gpt-oss"
LLAMACPP_SWIGLU_LIMIT = 7.0
DENSE_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "bf16": gguf.GGMLQuantizationType.BF16}
FILE_TYPES = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "bf16": gguf.LlamaFileType.MOSTLY_BF16}
F32 = gguf.GGMLQuantizationType.F32
MXFP4 = gguf.GGMLQuantizationType.MXFP4
Q8_ROWS_PER_CHUNK = 4096  # rows quantised at a time: the 20b embedding in float32 at once would be 2.3 GB


# -- MXFP4 ----------------------------------------------------------------------------------------

def mxfp4_to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Checkpoint MXFP4 [..., n_blocks, 16] + scales [..., n_blocks] → GGML blocks [..., n_blocks * 17] (uint8).

    The checkpoint packs value 2j in the low nibble of byte j and 2j+1 in its high nibble; a GGML
    block packs value j in the low nibble and j+16 in the high one, after the E8M0 scale byte
    (the same exponent byte in both). The FP4 codes themselves are identical.
    """
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # [..., n_blocks, 32] in value order
    ggml_qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = torch.cat((scales.unsqueeze(-1), ggml_qs), dim=-1)  # [..., n_blocks, 17]
    return out.flatten(-2).contiguous().numpy()


# -- the tokenizer --------------------------------------------------------------------------------

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, which llama.cpp's BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair-encode `token` using only merges ranked below `max_rank` (tiktoken's rank = merge order)."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]


@lru_cache(maxsize=1)
def harmony_vocab(vocab_size: int) -> Vocab:
    """o200k_harmony as llama.cpp's `gpt2` tokenizer model: byte-level token strings, types and merges.

    A tiktoken vocabulary has ranks but no merge list; the merge that makes a token is the pair its
    bytes reduce to when only lower-ranked merges apply (tens of seconds for 200k tokens).
    """
    to_unicode = _byte_to_unicode()
    pieces = [tokenizer.token_bytes(i) for i in range(vocab_size)]
    ranks = {piece: i for i, piece in enumerate(pieces) if not tokenizer.is_special(i)}
    tokens, types, merges = [], [], []
    for i, piece in enumerate(pieces):
        if tokenizer.is_special(i):
            tokens.append(piece.decode())
            types.append(gguf.TokenType.CONTROL)
            continue
        tokens.append("".join(to_unicode[b] for b in piece))
        types.append(gguf.TokenType.NORMAL)
        if len(piece) > 1:
            left, right = _merge_parts(ranks, piece, i)
            merges.append("".join(to_unicode[b] for b in left) + " " + "".join(to_unicode[b] for b in right))
    return Vocab(tokens, types, merges)


# -- the plan: every tensor's name, type, shape and how to make it --------------------------------

@dataclass(frozen=True)
class Planned:
    name: str
    qtype: gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # float32 array (F32), or the raw uint8 bytes of a quantised type
    byte_shape: tuple[int, ...]


def _f32(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().contiguous().numpy()


def _dense(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A bf16 matrix [rows, cols] → bytes of `qtype` (bf16: the same bits; q8_0: llama.cpp's rounding)."""
    if qtype == gguf.GGMLQuantizationType.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    rows, cols = tensor.shape
    out = np.empty((rows, cols // 32 * 34), dtype=np.uint8)
    for begin in range(0, rows, Q8_ROWS_PER_CHUNK):
        chunk = tensor[begin:begin + Q8_ROWS_PER_CHUNK].float().numpy()
        out[begin:begin + len(chunk)] = gguf.quants.quantize(chunk, qtype)
    return out


def _dense_shape(shape: tuple[int, int], qtype: gguf.GGMLQuantizationType) -> tuple[int, int]:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return shape[0], shape[1] // block * size


def tensor_plan(ckpt: Checkpoint, dense: str) -> list[Planned]:
    c, w, dq = ckpt.config, ckpt.tensors, DENSE_TYPES[dense]
    plan: list[Planned] = []
    # Every `make` runs after the loop: each lambda binds its names as defaults (no late binding).

    def f32(name: str, tensor_fn: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> None:
        plan.append(Planned(name, F32, lambda: _f32(tensor_fn()), shape))

    def matrix(name: str, tensor_fn: Callable[[], torch.Tensor], shape: tuple[int, int]) -> None:
        plan.append(Planned(name, dq, lambda: _dense(tensor_fn(), dq), _dense_shape(shape, dq)))

    def experts(name: str, blocks_fn: Callable[[], torch.Tensor], scales_fn: Callable[[], torch.Tensor], shape: tuple[int, int, int]) -> None:
        plan.append(Planned(name, MXFP4, lambda: mxfp4_to_ggml(blocks_fn(), scales_fn()), (shape[0], shape[1], shape[2] // 32 * 17)))

    H, I, E = c.hidden_size, c.intermediate_size, c.num_experts
    q, kv = c.q_size, c.kv_size
    matrix("token_embd.weight", lambda: w["embedding.weight"], (c.vocab_size, H))
    for i in range(c.num_hidden_layers):
        p, b = f"block.{i}.", f"blk.{i}."
        qkv_w, qkv_b = p + "attn.qkv.weight", p + "attn.qkv.bias"
        f32(b + "attn_norm.weight", lambda n=p + "attn.norm.scale": w[n], (H,))
        for part, begin, size in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
            rows = slice(begin, begin + size)
            matrix(b + f"attn_{part}.weight", lambda s=rows, n=qkv_w: w[n][s], (size, H))
            f32(b + f"attn_{part}.bias", lambda s=rows, n=qkv_b: w[n][s], (size,))
        matrix(b + "attn_output.weight", lambda n=p + "attn.out.weight": w[n], (H, q))
        f32(b + "attn_output.bias", lambda n=p + "attn.out.bias": w[n], (H,))
        f32(b + "attn_sinks.weight", lambda n=p + "attn.sinks": w[n], (c.num_attention_heads,))
        f32(b + "post_attention_norm.weight", lambda n=p + "mlp.norm.scale": w[n], (H,))
        f32(b + "ffn_gate_inp.weight", lambda n=p + "mlp.gate.weight": w[n], (E, H))
        f32(b + "ffn_gate_inp.bias", lambda n=p + "mlp.gate.bias": w[n], (E,))
        # mlp1's rows interleave the two halves of SwiGLU: even rows gate (glu), odd rows up (linear).
        for part, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):
            experts(b + f"ffn_{part}_exps.weight", lambda r=rows, n=p + "mlp.mlp1_weight.blocks": w[n][:, r],
                    lambda r=rows, n=p + "mlp.mlp1_weight.scales": w[n][:, r], (E, I, H))
            f32(b + f"ffn_{part}_exps.bias", lambda r=rows, n=p + "mlp.mlp1_bias": w[n][:, r], (E, I))
        experts(b + "ffn_down_exps.weight", lambda n=p + "mlp.mlp2_weight.blocks": w[n],
                lambda n=p + "mlp.mlp2_weight.scales": w[n], (E, H, I))
        f32(b + "ffn_down_exps.bias", lambda n=p + "mlp.mlp2_bias": w[n], (E, H))
    f32("output_norm.weight", lambda: w["norm.scale"], (H,))
    matrix("output.weight", lambda: w["unembedding.weight"], (c.vocab_size, H))
    return plan


# -- writing --------------------------------------------------------------------------------------

def _add_hyperparameters(writer: gguf.GGUFWriter, c: ModelConfig, dense: str) -> None:
    writer.add_name(f"ossrun random gpt-oss ({dense})")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(MAX_CONTEXT)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_expert_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_expert_count(c.num_experts)
    writer.add_expert_used_count(c.experts_per_token)
    writer.add_sliding_window(c.sliding_window)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(c.rope_scaling_factor)
    writer.add_rope_scaling_orig_ctx_len(c.initial_context_length)
    writer.add_rope_scaling_yarn_beta_fast(c.rope_ntk_beta)
    writer.add_rope_scaling_yarn_beta_slow(c.rope_ntk_alpha)
    writer.add_file_type(FILE_TYPES[dense])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, c: ModelConfig) -> None:
    vocab = harmony_vocab(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-4o")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(tokenizer.ENDOFTEXT - 1)  # <|startoftext|>
    writer.add_eos_token_id(tokenizer.RETURN)
    writer.add_pad_token_id(tokenizer.ENDOFTEXT)


def convert(model_dir: str | Path, out: str | Path, dense: str = "q8_0") -> Path:
    """Write `out` (a .gguf) from the checkpoint in `model_dir`, one tensor in memory at a time."""
    ckpt = load_checkpoint(model_dir)
    c = ckpt.config
    if c.swiglu_limit != LLAMACPP_SWIGLU_LIMIT:
        raise ValueError(f"llama.cpp hard-codes swiglu_limit {LLAMACPP_SWIGLU_LIMIT}; this checkpoint has {c.swiglu_limit}")
    if c.vocab_size != tokenizer.VOCAB_SIZE:
        raise ValueError(f"the harmony tokenizer has {tokenizer.VOCAB_SIZE} tokens; this checkpoint has {c.vocab_size}")
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, ARCH)
    _add_hyperparameters(writer, c, dense)
    _add_tokenizer(writer, c)
    plan = tensor_plan(ckpt, dense)
    for t in plan:
        nbytes = int(np.prod(t.byte_shape)) * (4 if t.qtype == F32 else 1)
        writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.float32 if t.qtype == F32 else np.uint8), nbytes,
                               raw_dtype=None if t.qtype == F32 else t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in plan:
        writer.write_tensor_data(t.make())
    writer.close()
    partial.rename(out)  # a killed conversion never leaves a file that looks complete
    return out


def gguf_path(model_dir: str | Path, dense: str, out_dir: str | Path | None = None) -> Path:
    """Where the benchmark keeps the GGUF of `model_dir` in layout `dense` (next to the checkpoint by default)."""
    model_dir = Path(model_dir)
    return Path(out_dir or model_dir.parent) / f"{model_dir.name}-{dense}.gguf"


def ensure_gguf(model_dir: str | Path, dense: str, out_dir: str | Path | None = None) -> Path:
    """The GGUF of `model_dir` in layout `dense`, converted once."""
    path = gguf_path(model_dir, dense, out_dir)
    if not path.exists():
        start = time.perf_counter()
        convert(model_dir, path, dense)
        log.info("converted %s → %s in %.0f s", model_dir, path, time.perf_counter() - start)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an ossrun checkpoint directory (ossrun make-model --out DIR)")
    parser.add_argument("--out-dir", default=None, help="where the .gguf files go (default: next to the checkpoint)")
    parser.add_argument("--dense", nargs="+", default=list(DENSE_TYPES), choices=list(DENSE_TYPES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for dense in args.dense:
        print(ensure_gguf(args.model, dense, args.out_dir))


if __name__ == "__main__":
    main()
