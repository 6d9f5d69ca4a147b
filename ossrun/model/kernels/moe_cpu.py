"""The fast-precision MoE on the CPU: packed MXFP4 experts times int8 activations (`moe_q8_cpu.c`).

Activations are quantised per 32-value block to int8 with one fp32 scale; the experts stay packed
and are decoded to int8 in registers, so a decode step reads only the 4.25-bit weights. One native
call runs a whole MoE layer (both projections, biases, SwiGLU and the routing-weighted sum) for
every expert routed that step. Every function takes `isa` to force a variant (the tests load each
one); by default the variant is `build.selected_isa()` (or the next weaker one, where that does not build).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from ossrun.model.kernels.build import kernels_enabled, load_library, load_selected

_SOURCE = Path(__file__).with_name("moe_q8_cpu.c")
_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "moe_q8_quantize": (ctypes.c_int, [_P, _I64, _I, _P, _P, _P]),
    "moe_q8_decode": (None, [_P, _I64, _P]),
    "moe_q8_swiglu": (None, [_P, _P, _I64, _F, _P]),
    "moe_q8_linear": (ctypes.c_int, [_P, _P, _P, _P, _I, _P, _P, _I, _P, _P, _I, _P, _P, _I]),
    "moe_q8_amx_active": (ctypes.c_int, []),
    "moe_q8_layer": (ctypes.c_int, [_P, _I64, _I, _I, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _F, _P, _P, _P, _P, _P, _P, _P, _P, _I]),
}
_configured: set[int] = set()


def library(isa: str | None = None) -> ctypes.CDLL | None:
    """The kernel library for `isa` (default: the selected one), or None where it cannot be built or is turned off."""
    if not kernels_enabled():
        return None
    lib = load_library(_SOURCE, isa) if isa else load_selected(_SOURCE)
    if lib is not None and id(lib) not in _configured:
        for name, (restype, argtypes) in _SIGNATURES.items():
            getattr(lib, name).restype = restype
            getattr(lib, name).argtypes = argtypes
        _configured.add(id(lib))
    return lib


def moe_q8_available(device: torch.device) -> bool:
    return device.type == "cpu" and library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int, what: str) -> None:
    if status == -3:
        raise MemoryError(f"{what}: the kernel could not allocate its working buffers")
    if status != 0:
        raise ValueError(f"{what}: the kernel rejected these shapes (sizes must be multiples of 32)")


def quantize_rows(x: torch.Tensor, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, K] → int8 q [R, K] (each block's 16 even elements, then its 16 odd ones), fp32 scales [R, K/32]
    and int32 block sums Σq [R, K/32]."""
    x = x.float().contiguous()
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=torch.int8)
    d = torch.empty(rows, k // 32, dtype=torch.float32)
    s = torch.empty(rows, k // 32, dtype=torch.int32)
    _check(library(isa).moe_q8_quantize(x.data_ptr(), rows, k, q.data_ptr(), d.data_ptr(), s.data_ptr()), "moe_q8_quantize")
    return q, d, s


def decode_nibbles(blocks: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """Packed blocks [..., 16] → int8 [..., 32]: twice the E2M1 values, in the kernels' (evens, odds) order."""
    blocks = blocks.contiguous()
    n = blocks.numel() // 16
    out = torch.empty(*blocks.shape[:-1], 32, dtype=torch.int8)
    library(isa).moe_q8_decode(blocks.data_ptr(), n, out.data_ptr())
    return out


def swiglu_blocks(h: torch.Tensor, bias: torch.Tensor, limit: float, isa: str | None = None) -> torch.Tensor:
    """The layer's SwiGLU on its own (tests): h and bias [n, 64·m], glu and linear interleaved → [n, 32·m]."""
    h, bias = h.float().contiguous(), bias.float().contiguous()
    act = torch.empty(*h.shape[:-1], h.shape[-1] // 2, dtype=torch.float32)
    library(isa).moe_q8_swiglu(h.data_ptr(), bias.data_ptr(), h.numel() // 64, limit, act.data_ptr())
    return act


def q8_grouped_linear(q: torch.Tensor, d: torch.Tensor, s: torch.Tensor, row_of: torch.Tensor | None, offsets: torch.Tensor,
                      experts: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                      isa: str | None = None) -> torch.Tensor:
    """One projection for rows grouped by expert, on activations as `quantize_rows` returns them: output row p (group g = offsets[g]:offsets[g+1], expert
    experts[g]) is activation row row_of[p] (p when None) times the expert's packed weights
    (blocks [E, O, K/32, 16], scales [E, O, K/32]) plus bias [E, O] → [P, O] fp32."""
    k = q.shape[1]
    out_features = blocks.shape[1]
    offsets, experts = offsets.to(torch.int64).contiguous(), experts.to(torch.int64).contiguous()
    row_of = None if row_of is None else row_of.to(torch.int64).contiguous()
    bias = None if bias is None else bias.float().contiguous()
    blocks, scales = blocks.contiguous(), scales.contiguous()
    y = torch.empty(int(offsets[-1]), out_features, dtype=torch.float32)
    status = library(isa).moe_q8_linear(q.data_ptr(), d.data_ptr(), s.data_ptr(), _ptr(row_of), k, offsets.data_ptr(), experts.data_ptr(),
                                        len(experts), blocks.data_ptr(), scales.data_ptr(), out_features, _ptr(bias), y.data_ptr(),
                                        torch.get_num_threads())
    _check(status, "moe_q8_linear")
    return y


class _Scratch(threading.local):
    """Grow-only buffers for the quantised activations, one set per thread: nothing is allocated per step
    once the largest step has been seen."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[name] = torch.empty(max(size, 1), dtype=dtype)
        return buffer


_scratch = _Scratch()


class Q8Experts:
    """One MoE layer's packed experts, ready for the native call: checked and made contiguous once, at load.

    mlp1 = (blocks [E, 2I, H/32, 16], scales [E, 2I, H/32], bias [E, 2I]); mlp2 likewise with [E, H, I/32, ...].
    """

    def __init__(self, mlp1: tuple[torch.Tensor, torch.Tensor, torch.Tensor], mlp2: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 limit: float):
        self.blocks1, self.scales1, self.blocks2, self.scales2 = (t.contiguous() for t in (*mlp1[:2], *mlp2[:2]))
        self.bias1, self.bias2 = mlp1[2].float().contiguous(), mlp2[2].float().contiguous()
        self.experts, self.hidden = self.blocks2.shape[:2]
        self.inter = self.blocks2.shape[2] * 32
        if self.blocks1.shape != (self.experts, 2 * self.inter, self.hidden // 32, 16) or self.bias1.shape != (self.experts, 2 * self.inter):
            raise ValueError(f"mlp1 {tuple(self.blocks1.shape)} does not match mlp2 {tuple(self.blocks2.shape)}")
        self.limit = float(limit)
        self._weights = [t.data_ptr() for t in (self.blocks1, self.scales1, self.bias1, self.blocks2, self.scales2, self.bias2)]

    def __call__(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, isa: str | None = None) -> torch.Tensor:
        """x [T, H], the router's choices experts [T, k] and weights [T, k] → Σ_j weights[t, j]·expert(x[t]) [T, H] fp32."""
        x = x.float().contiguous()
        experts = experts.to(torch.int64).contiguous()
        weights = weights.float().contiguous()
        tokens, k = experts.shape
        pairs = tokens * k
        out = torch.empty(tokens, self.hidden, dtype=torch.float32)
        scratch = [_scratch.get("xq", tokens * self.hidden, torch.int8), _scratch.get("xd", tokens * self.hidden // 32, torch.float32),
                   _scratch.get("xs", tokens * self.hidden // 32, torch.int32),
                   _scratch.get("hq", pairs * self.inter, torch.int8), _scratch.get("hd", pairs * self.inter // 32, torch.float32),
                   _scratch.get("hs", pairs * self.inter // 32, torch.int32),
                   _scratch.get("route", 2 * pairs + 2 * self.experts + 1, torch.int64)]
        status = library(isa).moe_q8_layer(x.data_ptr(), tokens, self.hidden, self.inter, experts.data_ptr(), weights.data_ptr(), k,
                                           self.experts, *self._weights, self.limit, *(t.data_ptr() for t in scratch), out.data_ptr(),
                                           torch.get_num_threads())
        if status == -2:
            raise ValueError(f"expert ids must be in 0..{self.experts - 1}")
        _check(status, "moe_q8_layer")
        return out
