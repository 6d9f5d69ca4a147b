"""All transformer blocks of a step in one native call (`blocks_cpu.c`): the fast precision's CPU forward.

`GptOss` builds a `NativeBlocks` when every block can run natively (fast precision on the CPU, Q8 dense
projections, the Q8 MoE, a C compiler) and uses it for every step over the paged cache, LoRA rows
included (their low-rank additions are made in the same call, so a base row's numbers never depend
on the adapters beside it in the step); the modules stay the reference and the path for everything
else. The weights are the modules' own tensors (the router's converted to fp32 once) and the
adapters' fp32 tensors, read in place: nothing is copied per step.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ossrun.model.kernels.build import kernels_enabled, load_selected
from ossrun.model.lora import TARGETS, LoraBatch

if TYPE_CHECKING:
    from ossrun.model.attention import PagedAttention
    from ossrun.model.gpt_oss import GptOss

_HERE = Path(__file__).parent
_SOURCE = _HERE / "blocks_cpu.c"
_LINKED = (_HERE / "q8_cpu.c", _HERE / "moe_q8_cpu.c", _HERE / "attention_cpu.c")
_P, _F, _I = ctypes.c_void_p, ctypes.c_float, ctypes.c_int


class _Q8(ctypes.Structure):
    _fields_ = [("values", _P), ("scales", _P), ("scale", _F), ("bias", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("qkv", _Q8), ("sinks", _P), ("out", _Q8), ("mlp_norm", _P), ("gate_weight", _P),
                ("gate_bias", _P), ("blocks1", _P), ("scales1", _P), ("bias1", _P), ("blocks2", _P), ("scales2", _P),
                ("bias2", _P), ("k_cache", _P), ("v_cache", _P), ("window", _I), ("sliding", _I)]


class _Dims(ctypes.Structure):
    _fields_ = [("H", _I), ("Hq", _I), ("Hkv", _I), ("D", _I), ("E", _I), ("k", _I), ("I", _I), ("layers", _I),
                ("eps", _F), ("limit", _F), ("attn_scale", _F), ("cache_bf16", _I), ("block_size", _I)]


class _Group(ctypes.Structure):
    _fields_ = [("slot_mapping", _P), ("block_tables", _P), ("first_block", _P), ("context_lens", _P), ("table_width", _I)]


class _LoraPair(ctypes.Structure):
    _fields_ = [("a", _P), ("b", _P)]


class _Lora(ctypes.Structure):
    _fields_ = [("n_rows", ctypes.c_int64), ("rows", _P), ("rank", _I), ("scaling", _F), ("pairs", _P)]


class _Step(ctypes.Structure):
    _fields_ = [("T", ctypes.c_int64), ("n_seqs", _I), ("query_starts", _P), ("query_lens", _P), ("positions", _P),
                ("cos", _P), ("sin", _P), ("groups", _Group * 2), ("n_lora", _I), ("lora", _P)]


def _library() -> ctypes.CDLL | None:
    if not kernels_enabled():
        return None
    lib = load_selected(_SOURCE, _LINKED)
    if lib is not None:
        lib.blocks_forward.restype = ctypes.c_int
        lib.blocks_forward.argtypes = [ctypes.POINTER(_Dims), ctypes.POINTER(_Layer), ctypes.POINTER(_Step), _P, _I]
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _q8(linear) -> _Q8:
    return _Q8(linear.values.data_ptr(), linear.scales.data_ptr(), linear.scale, _ptr(linear.bias))


def _lora(batch: LoraBatch | None, layers: int) -> tuple[ctypes.Array | None, list]:
    """The step's adapters as `Lora` entries (None without any), and what must stay alive while the call runs.

    The engine loads adapters in fp32 for this model (`GptOss.adapter_dtype`): their tensors are read in place
    (another dtype is converted for this call).
    """
    if batch is None or not batch.groups:
        return None, []
    entries, keep = (_Lora * len(batch.groups))(), []
    for entry, (rows, adapter) in zip(entries, batch.groups):
        pairs = (_LoraPair * (layers * len(TARGETS)))()
        for layer, targets in adapter.weights.items():
            for target, (a, b) in targets.items():
                a, b = a.float().contiguous(), b.float().contiguous()
                pairs[layer * len(TARGETS) + TARGETS.index(target)] = _LoraPair(a.data_ptr(), b.data_ptr())
                keep += [a, b]
        rows = rows.to(torch.int64).contiguous()
        keep += [rows, pairs]
        entry.n_rows, entry.rows, entry.rank, entry.scaling = len(rows), rows.data_ptr(), adapter.rank, adapter.scaling
        entry.pairs = ctypes.addressof(pairs)
    return entries, keep


class NativeBlocks:
    """The blocks of one fast-precision CPU model, ready for `blocks_forward`; `build` says None where one cannot run."""

    def __init__(self, model: GptOss, lib: ctypes.CDLL):
        c = model.config
        self._lib = lib
        # fp32 copies of the routers (E × H each: 0.3 MB a layer at 20b) and fp32 biases; the rest are the modules' tensors
        self._keep = [(b.mlp.gate_weight.float().contiguous(), b.mlp.gate_bias.float().contiguous()) for b in model.blocks]
        self._layers = (_Layer * len(model.blocks))()
        for i, (block, (gate_w, gate_b)) in enumerate(zip(model.blocks, self._keep)):
            attn, mlp = block.attn, block.mlp
            layer = self._layers[i]
            layer.attn_norm, layer.qkv, layer.sinks = attn.norm.scale.data_ptr(), _q8(attn.qkv), attn.sinks.data_ptr()
            layer.out, layer.mlp_norm = _q8(attn.out), mlp.norm.scale.data_ptr()
            layer.gate_weight, layer.gate_bias = gate_w.data_ptr(), gate_b.data_ptr()
            q8 = mlp.q8
            layer.blocks1, layer.scales1, layer.bias1 = q8.blocks1.data_ptr(), q8.scales1.data_ptr(), q8.bias1.data_ptr()
            layer.blocks2, layer.scales2, layer.bias2 = q8.blocks2.data_ptr(), q8.scales2.data_ptr(), q8.bias2.data_ptr()
            layer.window, layer.sliding = attn.window or 0, int(attn.window is not None)
        self._dims = _Dims(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_experts,
                           c.experts_per_token, c.intermediate_size, len(model.blocks), c.rms_norm_eps, c.swiglu_limit,
                           model.blocks[0].attn.scale, 0, 0)
        self._caches: list | None = None

    @classmethod
    def build(cls, model: GptOss) -> NativeBlocks | None:
        """For a fast-precision CPU model whose every projection is Q8 and every MoE the Q8 kernel; else None."""
        if model.precision != "fast" or model.device.type != "cpu":
            return None
        if not all(b.attn.qkv.quantized and b.attn.out.quantized and b.mlp.use_q8 for b in model.blocks):
            return None
        lib = _library()
        return None if lib is None else cls(model, lib)

    @staticmethod
    def accepts(attention: object) -> bool:
        """Whether a step with this attention backend can run natively: the paged cache with the CPU kernel."""
        from ossrun.model.attention import PagedAttention

        return isinstance(attention, PagedAttention) and attention.kernel is not None and not attention.triton

    def _bind_caches(self, attention: PagedAttention) -> None:
        """Point every layer at its KV pools (once per cache list: the engine allocates them once)."""
        if self._caches is attention.caches:
            return
        k0 = attention.caches[0][0]
        if k0.dtype not in (torch.bfloat16, torch.float32) or not all(k.is_contiguous() and v.is_contiguous() for k, v in attention.caches):
            raise TypeError("the native blocks need contiguous bf16 or fp32 KV pools")
        for layer, (k, v) in zip(self._layers, attention.caches):
            layer.k_cache, layer.v_cache = k.data_ptr(), v.data_ptr()
        self._dims.cache_bf16, self._dims.block_size = int(k0.dtype == torch.bfloat16), attention.block_size
        self._caches = attention.caches

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attention: PagedAttention,
                 lora: LoraBatch | None = None) -> torch.Tensor:
        """x [T, H] fp32 (the embeddings) through every block, in place → x. `rope`: the step's cos, sin [T, 1, D/2];
        `lora`: which rows run with which adapter (None: all on the base model)."""
        self._bind_caches(attention)
        cos, sin = (t.float().contiguous() for t in rope)
        groups = []
        for name in ("full", "sliding"):
            g = attention.groups[name]
            tables = g.block_tables.contiguous()
            groups.append((g.slot_mapping.contiguous(), tables, g.first_block.contiguous(), g.context_lens.contiguous()))
        step = _Step(x.shape[0], len(attention.query_starts), attention._starts.data_ptr(), attention._lens.data_ptr(),
                     attention.positions.data_ptr(), cos.data_ptr(), sin.data_ptr())
        for i, (slots, tables, first, context) in enumerate(groups):
            step.groups[i] = _Group(slots.data_ptr(), tables.data_ptr(), first.data_ptr(), context.data_ptr(),
                                    tables.shape[1] if tables.dim() == 2 else 0)
        adapters, keep = _lora(lora, len(self._layers))
        if adapters is not None:
            step.n_lora, step.lora = len(adapters), ctypes.addressof(adapters)
        status = self._lib.blocks_forward(ctypes.byref(self._dims), self._layers, ctypes.byref(step), x.data_ptr(),
                                          torch.get_num_threads())
        del keep  # the adapters' tensors were read by the call; only now may they go
        if status != 0:
            raise ValueError(f"blocks_forward refused the step (status {status})")
        return x
