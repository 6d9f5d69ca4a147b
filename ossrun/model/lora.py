"""LoRA adapters in PEFT's format on the attention projections, applied per row of a flat batch.

Supported targets are `q_proj`, `k_proj`, `v_proj` and `o_proj`: PEFT's LoRA wraps `nn.Linear`
modules, and in gpt-oss those are the attention projections (and the router); the experts are
packed 3-D MXFP4 parameters that PEFT does not wrap as Linear layers. The router is left out on
purpose: a low-rank change there re-routes tokens, which is rarely what a fine-tune wants and
would make expert choice adapter-dependent.

One step may mix rows of the base model and of several adapters: rows are grouped by adapter and
each group gets its own two thin matmuls (x·Aᵀ·Bᵀ·scale), added to the base projection.
"""

from __future__ import annotations

import json
import math
import re
from struct import error as struct_error
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ossrun.model.config import ModelConfig
from ossrun.model.safetensors_io import TensorSpec, open_mmap, write_streaming

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MAX_RANK = 32
_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.lora_([AB])(?:\.default)?\.weight")


class AdapterError(ValueError):
    """An adapter that cannot be used with this model; the message says why."""


@dataclass(slots=True)
class LoraAdapter:
    name: str
    rank: int
    scaling: float
    # layer → target → (A [r, in], B [out, r])
    weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for layer in self.weights.values() for a, b in layer.values())


def _in_out(config: ModelConfig, target: str) -> tuple[int, int]:
    c = config
    return {"q_proj": (c.hidden_size, c.q_size), "k_proj": (c.hidden_size, c.kv_size),
            "v_proj": (c.hidden_size, c.kv_size), "o_proj": (c.q_size, c.hidden_size)}[target]


def load_peft_adapter(path: str | Path, config: ModelConfig, name: str, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> LoraAdapter:
    """Read and check a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`)."""
    path = Path(path)
    try:
        settings = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8 at all
        raise AdapterError(f"adapter {name}: adapter_config.json unreadable: {exc}") from None
    if not isinstance(settings, dict):
        raise AdapterError(f"adapter {name}: adapter_config.json must hold a JSON object")
    rank, alpha = settings.get("r"), settings.get("lora_alpha", settings.get("r"))
    if settings.get("peft_type", "LORA") != "LORA" or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"adapter {name}: not a PEFT LoRA adapter (peft_type LORA with an integer r)")
    if rank > MAX_RANK:
        raise AdapterError(f"adapter {name}: rank {rank} is over the maximum of {MAX_RANK}")
    if settings.get("use_dora") or settings.get("rank_pattern") or settings.get("alpha_pattern") or settings.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name}: DoRA, per-module rank/alpha patterns and LoRA biases are not supported")
    targets = settings.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unsupported = sorted(set(targets) - set(TARGETS))
    if unsupported:
        raise AdapterError(f"adapter {name}: target modules {unsupported} are not supported (only {', '.join(TARGETS)})")
    scaling = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    try:
        stored = open_mmap(path / "adapter_model.safetensors")
    except (OSError, ValueError, KeyError, UnicodeDecodeError, struct_error) as exc:
        raise AdapterError(f"adapter {name}: adapter_model.safetensors unreadable: {exc}") from None
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in stored.items():
        match = _NAME.fullmatch(key)
        if match is None:
            raise AdapterError(f"adapter {name}: unexpected tensor {key}")
        layer, target, half = int(match[1]), match[2], match[3]
        if layer >= config.num_hidden_layers:
            raise AdapterError(f"adapter {name}: tensor for layer {layer}, the model has {config.num_hidden_layers}")
        halves.setdefault((layer, target), {})[half] = tensor
    adapter = LoraAdapter(name, rank, scaling)
    for (layer, target), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name}: layer {layer} {target} lacks lora_A or lora_B")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = _in_out(config, target)
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise AdapterError(f"adapter {name}: layer {layer} {target} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                               f"expected ({rank}, {fan_in}) and ({fan_out}, {rank})")
        adapter.weights.setdefault(layer, {})[target] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
    if not adapter.weights:
        raise AdapterError(f"adapter {name}: no LoRA tensors")
    return adapter


def write_random_adapter(config: ModelConfig, out: str | Path, rank: int = 8, alpha: float | None = None, seed: int = 0,
                         targets: tuple[str, ...] = TARGETS, base_model: str = "openai/gpt-oss-20b") -> Path:
    """A random PEFT adapter (B not zero, so it changes the output) for tests and demos."""
    if rank > MAX_RANK:
        raise AdapterError(f"rank {rank} is over the maximum of {MAX_RANK}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank, "target_modules": list(targets),
                "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                "base_model_name_or_path": base_model, "task_type": "CAUSAL_LM", "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    g = torch.Generator().manual_seed(seed)
    specs, values = [], {}
    for layer in range(config.num_hidden_layers):
        for target in targets:
            fan_in, fan_out = _in_out(config, target)
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            values[prefix + ".lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / math.sqrt(fan_in)
            values[prefix + ".lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * (0.5 / rank)
    specs = [TensorSpec(n, torch.float32, tuple(t.shape)) for n, t in values.items()]
    write_streaming(out / "adapter_model.safetensors", specs, lambda spec: values[spec.name])
    return out


@dataclass(slots=True)
class LoraBatch:
    """Which rows of this step use which adapter: [(row indices, adapter)], base rows in no group."""

    groups: list[tuple[torch.Tensor, LoraAdapter]]

    def delta(self, layer: int, target: str, x: torch.Tensor, out_features: int) -> torch.Tensor | None:
        """The low-rank addition to `target`'s output for every row (zeros for base rows), or None."""
        result = None
        for rows, adapter in self.groups:
            pair = adapter.weights.get(layer, {}).get(target)
            if pair is None:
                continue
            a, b = pair
            if result is None:
                result = x.new_zeros(x.shape[0], out_features)
            xs = x.index_select(0, rows)
            result.index_add_(0, rows, ((xs @ a.T.to(x.dtype)) @ b.T.to(x.dtype)) * adapter.scaling)
        return result
