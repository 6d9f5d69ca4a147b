"""Trained demo model → the compact weights file (`ossrun.model.demo_weights`).

Each trained tensor gets the checkpoint's name and stored form: bf16, experts quantised to MXFP4
(the training forward already saw exactly these values), vocabulary matrices reduced to the rows
of the tokens the model knows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ossrun.demo_model.trainable import TrainableGptOss
from ossrun.demo_model.vocab import UNK, Vocab
from ossrun.model import demo_weights, mxfp4

_LAYER_NAMES = {
    "attn_norm": "attn.norm.scale", "qkv_weight": "attn.qkv.weight", "qkv_bias": "attn.qkv.bias", "sinks": "attn.sinks",
    "out_weight": "attn.out.weight", "out_bias": "attn.out.bias", "mlp_norm": "mlp.norm.scale",
    "gate_weight": "mlp.gate.weight", "gate_bias": "mlp.gate.bias", "mlp1_bias": "mlp.mlp1_bias", "mlp2_bias": "mlp.mlp2_bias",
}
_EXPERTS = {"mlp1_weight": "mlp.mlp1_weight", "mlp2_weight": "mlp.mlp2_weight"}


def checkpoint_tensors(model: TrainableGptOss, vocab: Vocab) -> dict[str, torch.Tensor]:
    """The compact file's tensors, by name."""
    bf16 = torch.bfloat16
    tensors: dict[str, torch.Tensor] = {
        demo_weights.TOKEN_IDS: vocab.ids_tensor(),
        demo_weights.UNKNOWN_EMBEDDING: model.embedding.detach()[UNK].to(bf16),
        demo_weights.EMBEDDING_ROWS: model.embedding.detach()[1:].to(bf16).contiguous(),
        demo_weights.UNEMBEDDING_ROWS: model.unembedding.detach()[1:].to(bf16).contiguous(),
        "norm.scale": model.norm.detach().to(bf16),
    }
    for i, block in enumerate(model.blocks):
        for attr, name in _LAYER_NAMES.items():
            tensors[f"block.{i}.{name}"] = getattr(block, attr).detach().to(bf16).contiguous()
        for attr, name in _EXPERTS.items():
            blocks, scales = mxfp4.quantize(getattr(block, attr).detach())
            tensors[f"block.{i}.{name}.blocks"], tensors[f"block.{i}.{name}.scales"] = blocks, scales
    return tensors


def export(model: TrainableGptOss, vocab: Vocab, out: Path, metadata: dict[str, str]) -> Path:
    demo_weights.write_compact(out, model.config, checkpoint_tensors(model, vocab), metadata)
    return out
