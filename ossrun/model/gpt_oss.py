"""gpt-oss in plain PyTorch, computed as OpenAI's reference computes it.

The forward takes a flat batch: the tokens of several sequences side by side with their
positions, and an attention backend that knows where each sequence's keys live. That is what
lets the engine batch prefills and decodes of many requests into one step.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ossrun.model import mxfp4
from ossrun.model.attention import AttentionBackend, PagedAttention
from ossrun.model.checkpoint import Checkpoint
from ossrun.model.config import ModelConfig, yarn_parameters
from ossrun.model.dense import DenseLinear
from ossrun.model.kernels import mxfp4_grouped_linear, mxfp4_kernel_available
from ossrun.model.kernels.blocks_cpu import NativeBlocks
from ossrun.model.kernels.moe_cpu import Q8Experts, moe_q8_available
from ossrun.model.kernels.gpu import linear, triton_available
from ossrun.model.lora import LoraBatch

log = logging.getLogger(__name__)

SWIGLU_ALPHA = 1.702

# "exact": the reference computation at the model's dtype (fp32: equal to transformers at 1e-4).
# "fast": quantised weights and native kernels where they exist (int8 dense layers, packed MXFP4
# experts, a tiled attention kernel on the CPU; Triton on CUDA); elsewhere the same as "exact".
PRECISIONS = ("exact", "fast")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


class DeviceError(ValueError):
    """A device this torch cannot run the model on; the message says why and what to do."""


def check_device(device: torch.device | str) -> torch.device:
    """`device` parsed, or a DeviceError saying why not: checked before a checkpoint is read, so that a machine
    without CUDA fails in a line and not after mapping gigabytes (or inside torch with an assertion)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but sees no GPU"
            raise DeviceError(f"device {str(device)!r}: this torch ({torch.__version__}) is {build}; "
                              "the README says how to install on a CUDA machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise DeviceError(f"device {str(device)!r}: ossrun runs on cpu or cuda")
    return device


def _weight(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)


class RMSNorm(nn.Module):
    """Always in fp32: the norm's eps is part of the exact arithmetic (1e-4 off if computed in bf16).

    `triton`: one fused kernel (`kernels/triton_fused.py`) instead of a chain of elementwise ones.
    """

    def __init__(self, scale: torch.Tensor, eps: float, device: torch.device, triton: bool = False):
        super().__init__()
        self.triton = triton
        self.scale = _weight(scale, torch.float32, device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton:
            from ossrun.model.kernels.triton_fused import rms_norm

            return rms_norm(x, self.scale, self.eps)
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (t * self.scale).to(x.dtype)


class Rotary(nn.Module):
    """YaRN-scaled RoPE on the two halves of each head, from positions (not from 0..T-1)."""

    def __init__(self, config: ModelConfig, device: torch.device):
        super().__init__()
        concentration, low, high = yarn_parameters(config)
        d_half = config.head_dim // 2
        freq = config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
        if config.rope_scaling_factor > 1.0:
            ramp = (torch.arange(d_half, dtype=torch.float32) - low) / (high - low)
            mask = 1 - ramp.clamp(0, 1)
            inv_freq = (1.0 / (config.rope_scaling_factor * freq)) * (1 - mask) + (1.0 / freq) * mask
        else:
            inv_freq = 1.0 / freq
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.concentration = concentration

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for this step's positions [T] → cos, sin [T, 1, D/2] (fp32, shared by every layer)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        return (freqs.cos() * self.concentration).unsqueeze(1), (freqs.sin() * self.concentration).unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                 precision: str = "exact"):
        super().__init__()
        prefix = f"block.{layer}.attn."
        self.layer = layer
        self.config = config
        self.precision = check_precision(precision)
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.scale = config.head_dim ** -0.5
        self.triton = triton_available(device, precision)
        self.norm = RMSNorm(weights[prefix + "norm.scale"], config.rms_norm_eps, device, self.triton)
        self.qkv = DenseLinear(weights[prefix + "qkv.weight"], weights[prefix + "qkv.bias"], dtype, device, precision)
        self.sinks = _weight(weights[prefix + "sinks"], torch.float32, device)
        self.out = DenseLinear(weights[prefix + "out.weight"], weights[prefix + "out.bias"], dtype, device, precision)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attention: AttentionBackend,
                lora: LoraBatch | None = None) -> torch.Tensor:
        c = self.config
        tokens = x.shape[0]
        if self.triton and lora is None:  # the norm may be fused into the projection
            qkv = linear(self.qkv, x, norm=self.norm)  # [T, (Hq + 2 Hkv) D]
        else:
            t = self.norm(x)
            qkv = linear(self.qkv, t) if self.triton else self.qkv(t)
            if lora is not None:
                self._add_qkv_lora(qkv, t, lora)
        if self.triton and isinstance(attention, PagedAttention) and attention.triton:  # RoPE and cache writes fused
            o = attention.attend_qkv(self.layer, qkv, rope, c.num_attention_heads, self.sinks, self.window, self.scale)
        else:
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = Rotary.apply(q.view(tokens, c.num_attention_heads, c.head_dim), *rope)
            k = Rotary.apply(k.view(tokens, c.num_key_value_heads, c.head_dim), *rope)
            v = v.reshape(tokens, c.num_key_value_heads, c.head_dim)
            o = attention(self.layer, q, k, v, self.sinks, self.window, self.scale)
        o = o.reshape(tokens, c.q_size)  # [T, Hq·D]
        if self.triton and lora is None:  # the residual add fused into the projection
            return linear(self.out, o, residual=x)
        out = self.out(o)
        if lora is not None:
            delta = lora.delta(self.layer, "o_proj", o, c.hidden_size)
            if delta is not None:
                out = out + delta
        return x + out

    def _add_qkv_lora(self, qkv: torch.Tensor, t: torch.Tensor, lora: LoraBatch) -> None:
        c = self.config
        begin = 0
        for target, size in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
            delta = lora.delta(self.layer, target, t, size)
            if delta is not None:
                qkv[:, begin:begin + size] += delta
            begin += size


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved columns: glu = h[0::2], linear = h[1::2]."""
    glu = h[..., 0::2].clamp(max=limit)
    linear = h[..., 1::2].clamp(min=-limit, max=limit)
    return glu * torch.sigmoid(SWIGLU_ALPHA * glu) * (linear + 1)


class MoE(nn.Module):
    """Top-k-then-softmax router over MXFP4 experts that stay packed; only routed experts are touched.

    Exact precision: experts with few rows this step (decode) run in one fused packed-weight kernel
    call per projection for the whole layer; an expert with many rows (prefill) is expanded once and
    multiplied by BLAS, which amortises the expansion. Fast precision on the CPU: the whole layer is
    one native call on int8-quantised activations (`kernels/moe_cpu.py`), prefill and decode alike.
    Fast precision on CUDA: one grouped Triton kernel per projection serves every row (`kernels/triton_moe.py`).
    """

    KERNEL_MAX_ROWS = 64

    def __init__(self, config: ModelConfig, layer: int, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                 precision: str = "exact"):
        super().__init__()
        prefix = f"block.{layer}.mlp."
        self.config = config
        self.precision = check_precision(precision)
        self.dtype = dtype
        self.norm = RMSNorm(weights[prefix + "norm.scale"], config.rms_norm_eps, device, triton_available(device, precision))
        self.gate_weight = _weight(weights[prefix + "gate.weight"], dtype, device)
        self.gate_bias = _weight(weights[prefix + "gate.bias"], dtype, device)
        packed = {
            "mlp1_blocks": "mlp1_weight.blocks", "mlp1_scales": "mlp1_weight.scales",
            "mlp2_blocks": "mlp2_weight.blocks", "mlp2_scales": "mlp2_weight.scales",
        }
        for attr, name in packed.items():
            self.register_buffer(attr, weights[prefix + name].to(device), persistent=False)
        self.mlp1_bias = _weight(weights[prefix + "mlp1_bias"], dtype, device)
        self.mlp2_bias = _weight(weights[prefix + "mlp2_bias"], dtype, device)
        self.use_triton = triton_available(device, precision) and self._triton_decodes_scales(layer)
        # Scale bytes all ≤ 128 (blocks up to 12): the tensor-core decode then scales with one multiply (triton_moe_mma).
        self.small_scales = self.use_triton and int(torch.maximum(self.mlp1_scales.max(), self.mlp2_scales.max())) <= 128
        self.use_kernel = mxfp4_kernel_available(device)
        self.use_q8 = self.precision == "fast" and moe_q8_available(device)
        if self.use_kernel or self.use_q8:  # the kernels add biases in fp32
            self.register_buffer("mlp1_bias_f32", self.mlp1_bias.float(), persistent=False)
            self.register_buffer("mlp2_bias_f32", self.mlp2_bias.float(), persistent=False)
        if self.use_q8:  # fast precision: the whole layer's experts in one native call on int8 activations
            self.q8 = Q8Experts((self.mlp1_blocks, self.mlp1_scales, self.mlp1_bias_f32),
                                (self.mlp2_blocks, self.mlp2_scales, self.mlp2_bias_f32), config.swiglu_limit)

    # kernels/triton_moe.py builds a block's scale 2^(s−127)·2^14 as the fp32 number whose exponent field is s + 14: exact
    # for scale bytes 2..240 (241 gave NaN, 242+ flipped the sign). Real checkpoints use about 110..130.
    TRITON_SCALE_BYTES = (2, 240)

    def _triton_decodes_scales(self, layer: int) -> bool:
        """Whether every expert scale byte of this layer is in the Triton kernels' exact range; a layer with others
        runs the PyTorch path (correct, slower), said once in the log."""
        low = int(torch.minimum(self.mlp1_scales.min(), self.mlp2_scales.min()))
        high = int(torch.maximum(self.mlp1_scales.max(), self.mlp2_scales.max()))
        if self.TRITON_SCALE_BYTES[0] <= low and high <= self.TRITON_SCALE_BYTES[1]:
            return True
        log.warning("layer %d: MXFP4 scale bytes %d..%d reach outside %d..%d, which the Triton kernels decode exactly; "
                    "its experts run the PyTorch path", layer, low, high, *self.TRITON_SCALE_BYTES)
        return False

    def route(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ expert ids [T, k] and their weights [T, k] (softmax over the k chosen logits only)."""
        logits = F.linear(t, self.gate_weight, self.gate_bias)
        top = torch.topk(logits, self.config.experts_per_token, dim=-1, sorted=True)
        return top.indices, torch.softmax(top.values.float(), dim=-1).to(t.dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on the rows routed to it, expanded to the compute dtype (the reference path)."""
        w1 = mxfp4.dequantize(self.mlp1_blocks[e], self.mlp1_scales[e], self.dtype)  # [2I, H]
        h = swiglu(F.linear(x, w1, self.mlp1_bias[e]), self.config.swiglu_limit)
        w2 = mxfp4.dequantize(self.mlp2_blocks[e], self.mlp2_scales[e], self.dtype)  # [H, I]
        return F.linear(h, w2, self.mlp2_bias[e])

    def grouped_experts(self, x: torch.Tensor, offsets: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Rows of x grouped by expert (see `mxfp4_grouped_linear`) through their experts, packed, in two calls."""
        h = mxfp4_grouped_linear(x, offsets, experts, self.mlp1_blocks, self.mlp1_scales, self.mlp1_bias_f32).to(x.dtype)
        h = swiglu(h, self.config.swiglu_limit)
        return mxfp4_grouped_linear(h, offsets, experts, self.mlp2_blocks, self.mlp2_scales, self.mlp2_bias_f32).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:  # norm, routing, both projections, the weighted sum and the residual in Triton
            from ossrun.model.kernels.triton_moe import moe_layer

            return moe_layer(x, self.norm, (self.gate_weight, self.gate_bias), self.config.experts_per_token,
                             (self.mlp1_blocks, self.mlp1_scales, self.mlp1_bias), (self.mlp2_blocks, self.mlp2_scales, self.mlp2_bias),
                             self.config.swiglu_limit, self.small_scales)
        t = self.norm(x)
        experts, weights = self.route(t)
        if self.use_q8:
            return x + self.q8(t, experts, weights).to(x.dtype)
        k = self.config.experts_per_token
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        pair_expert, pair_token, pair_weight = flat[order], order // k, weights.reshape(-1)[order]
        counts = torch.bincount(pair_expert, minlength=self.config.num_experts)
        in_kernel = (counts[pair_expert] <= self.KERNEL_MAX_ROWS) if self.use_kernel else torch.zeros_like(pair_expert, dtype=torch.bool)
        out = torch.zeros_like(t)
        if bool(in_kernel.any()):
            pairs = torch.nonzero(in_kernel).squeeze(1)
            group_experts, group_sizes = torch.unique_consecutive(pair_expert[pairs], return_counts=True)
            offsets = torch.cat([group_sizes.new_zeros(1), group_sizes.cumsum(0)])
            y = self.grouped_experts(t[pair_token[pairs]], offsets, group_experts)
            out.index_add_(0, pair_token[pairs], y * pair_weight[pairs].unsqueeze(-1))
        for e in torch.unique(pair_expert[~in_kernel]).tolist():
            pairs = torch.nonzero((pair_expert == e) & ~in_kernel).squeeze(1)
            y = self.expert(e, t[pair_token[pairs]])
            out.index_add_(0, pair_token[pairs], y * pair_weight[pairs].unsqueeze(-1))
        return x + out


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                 precision: str = "exact"):
        super().__init__()
        self.precision = check_precision(precision)
        self.attn = Attention(config, layer, weights, dtype, device, precision)
        self.mlp = MoE(config, layer, weights, dtype, device, precision)

    def forward(self, x, rope, attention, lora=None):
        return self.mlp(self.attn(x, rope, attention, lora))


class GptOss(nn.Module):
    """The whole model; `precision` ("exact" or "fast", see PRECISIONS) is passed to every layer."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", precision: str = "exact"):
        super().__init__()
        device = check_device(device)
        self.precision = check_precision(precision)
        self.config = config
        self.dtype = dtype
        self.device = device
        self.embedding = _weight(weights["embedding.weight"], dtype, device)
        self.rotary = Rotary(config, device)
        self.blocks = nn.ModuleList(Block(config, i, weights, dtype, device, precision) for i in range(config.num_hidden_layers))
        self.triton = triton_available(device, precision)
        self.norm = RMSNorm(weights["norm.scale"], config.rms_norm_eps, device, self.triton)
        self.unembedding = DenseLinear(weights["unembedding.weight"], None, dtype, device, precision)
        # fast precision on the CPU: every block of a paged step in one native call (fp32 activations)
        self.native = NativeBlocks.build(self)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype LoRA adapters are loaded in: fp32 where the native blocks add them (they compute on fp32
        activations and read the adapters' tensors in place), else the model's dtype."""
        return torch.float32 if self.native is not None else self.dtype

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                        precision: str = "exact") -> "GptOss":
        return cls(checkpoint.config, checkpoint.tensors, dtype, device, precision)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionBackend,
        logits_indices: torch.Tensor | None = None,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """token_ids, positions [T] → logits [T, V] (fp32), or only the rows in `logits_indices`.

        `lora` says which rows run with which adapter (None: all on the base model).
        """
        x = F.embedding(token_ids, self.embedding)
        rope = self.rotary.cos_sin(positions)
        if self.native is not None and self.native.accepts(attention):
            x = self.native(x.float(), rope, attention, lora)
        else:
            for block in self.blocks:
                x = block(x, rope, attention, lora)
        if logits_indices is not None:
            x = x[logits_indices]
        if self.triton:
            return linear(self.unembedding, self.norm(x), torch.float32)
        return self.unembedding(self.norm(x), torch.float32)
