"""gpt-oss as a trainable PyTorch module: the same computation as `ossrun.model.gpt_oss.GptOss`, in
float32 with gradients, on a compact vocabulary, with experts as dense weights.

The forward computes what the exported checkpoint will: experts go through `round_to_mxfp4` and every
other weight through bf16 rounding (straight-through estimators), so training sees the weights the
server will load. Attention (`attention_with_sinks`), RoPE (`Rotary`) and SwiGLU are the model's own
functions; only the MoE is laid out for training (every expert on every token, then the top-k
picked), which is cheaper than routing at this size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ossrun.model.attention import attention_with_sinks, visibility
from ossrun.model.config import ModelConfig
from ossrun.model.gpt_oss import Rotary, swiglu
from ossrun.model.mxfp4 import round_to_mxfp4


def as_bf16(w: torch.Tensor) -> torch.Tensor:
    """w rounded to bf16 in the forward, gradient passed straight through."""
    return w + (w.detach().bfloat16().float() - w.detach())


def as_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """w rounded to MXFP4 (blocks of 32 along the last dimension) in the forward, straight-through gradient."""
    return w + (round_to_mxfp4(w.detach()) - w.detach())


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * as_bf16(scale)


def _param(*shape: int, std: float, generator: torch.Generator, mean: float = 0.0) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=generator) * std + mean)


class TrainableBlock(nn.Module):
    """One attention + MoE layer; parameter names follow the `original/` checkpoint (dots as underscores)."""

    def __init__(self, config: ModelConfig, layer: int, g: torch.Generator):
        super().__init__()
        c, h = config, config.hidden_size
        qkv = c.q_size + 2 * c.kv_size
        self.config, self.window = c, (c.sliding_window if c.is_sliding(layer) else None)
        self.attn_norm = _param(h, std=0.0, mean=1.0, generator=g)
        self.qkv_weight = _param(qkv, h, std=h ** -0.5, generator=g)
        self.qkv_bias = _param(qkv, std=0.0, generator=g)
        self.sinks = _param(c.num_attention_heads, std=0.0, generator=g)
        self.out_weight = _param(h, c.q_size, std=c.q_size ** -0.5 / math.sqrt(2 * c.num_hidden_layers), generator=g)
        self.out_bias = _param(h, std=0.0, generator=g)
        self.mlp_norm = _param(h, std=0.0, mean=1.0, generator=g)
        self.gate_weight = _param(c.num_experts, h, std=h ** -0.5, generator=g)
        self.gate_bias = _param(c.num_experts, std=0.0, generator=g)
        self.mlp1_weight = _param(c.num_experts, 2 * c.intermediate_size, h, std=h ** -0.5, generator=g)
        self.mlp1_bias = _param(c.num_experts, 2 * c.intermediate_size, std=0.0, generator=g)
        self.mlp2_weight = _param(c.num_experts, h, c.intermediate_size,
                                  std=c.intermediate_size ** -0.5 / math.sqrt(2 * c.num_hidden_layers), generator=g)
        self.mlp2_bias = _param(c.num_experts, h, std=0.0, generator=g)

    def attention(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch, tokens, _ = x.shape
        t = rms_norm(x, self.attn_norm, c.rms_norm_eps)
        qkv = F.linear(t, as_bf16(self.qkv_weight), as_bf16(self.qkv_bias))
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = Rotary.apply(q.view(batch, tokens, c.num_attention_heads, c.head_dim), *rope)
        k = Rotary.apply(k.view(batch, tokens, c.num_key_value_heads, c.head_dim), *rope)
        v = v.reshape(batch, tokens, c.num_key_value_heads, c.head_dim)
        allowed = visibility(positions, positions, self.window)[None]  # right padding: causal masking suffices
        o = attention_with_sinks(q, k, v, as_bf16(self.sinks), allowed, c.head_dim ** -0.5)
        return x + F.linear(o.reshape(batch, tokens, c.q_size), as_bf16(self.out_weight), as_bf16(self.out_bias))

    def moe(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        batch, tokens, hidden = x.shape
        t = rms_norm(x, self.mlp_norm, c.rms_norm_eps).reshape(-1, hidden)  # [N, H]
        top = torch.topk(F.linear(t, as_bf16(self.gate_weight), as_bf16(self.gate_bias)), c.experts_per_token, dim=-1)
        weights = torch.softmax(top.values, dim=-1)  # [N, k]
        # Every expert on every token as two large matmuls: [N, E·2I], then [E, N, I] @ [E, I, H].
        w1 = as_mxfp4(self.mlp1_weight).reshape(-1, hidden)
        h = (t @ w1.t()).view(-1, c.num_experts, 2 * c.intermediate_size) + as_bf16(self.mlp1_bias)
        act = swiglu(h, c.swiglu_limit).transpose(0, 1)  # [E, N, I]
        y = torch.bmm(act, as_mxfp4(self.mlp2_weight).transpose(1, 2)).transpose(0, 1) + as_bf16(self.mlp2_bias)  # [N, E, H]
        chosen = torch.gather(y, 1, top.indices.unsqueeze(-1).expand(-1, -1, hidden))  # [N, k, H]
        return x + (chosen * weights.unsqueeze(-1)).sum(dim=1).view(batch, tokens, hidden)

    def forward(self, x, rope, positions):
        return self.moe(self.attention(x, rope, positions))


class TrainableGptOss(nn.Module):
    """ids [B, T] (compact vocabulary) → logits [B, T, n_tokens]; row 0 of the unembedding (UNK) is unused."""

    def __init__(self, config: ModelConfig, n_tokens: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = config
        self.embedding = _param(n_tokens, config.hidden_size, std=1.0, generator=g)
        self.blocks = nn.ModuleList(TrainableBlock(config, i, g) for i in range(config.num_hidden_layers))
        self.norm = _param(config.hidden_size, std=0.0, mean=1.0, generator=g)
        self.unembedding = _param(n_tokens, config.hidden_size, std=config.hidden_size ** -0.5, generator=g)
        self.rotary = Rotary(config, torch.device("cpu"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])
        rope = self.rotary.cos_sin(positions)
        x = F.embedding(ids, as_bf16(self.embedding))
        for block in self.blocks:
            x = block(x, rope, positions)
        return F.linear(rms_norm(x, self.norm, self.config.rms_norm_eps), as_bf16(self.unembedding))
