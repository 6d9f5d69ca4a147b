"""A model of the few PTX instructions our inline-asm decoders use, to run their text on the CPU.

The interpreter runs no PTX, so on a machine without a GPU the decoders' bit tricks would go untested
until a device session. This executes the asm strings themselves (`mov`, `prmt`, `and`, `or`, `shl`,
`mul.lo.u32`, `fma.rn.bf16x2`) on 32-bit registers, with the semantics of NVIDIA's PTX ISA: `prmt`'s
default mode (a selector nibble picks one of the 8 bytes of {b, a}; with its top bit set, the picked
byte's sign is replicated), and bf16x2 `fma` computed exactly and rounded to nearest even, subnormals kept
(what the ISA specifies for bf16 arithmetic; whether the silicon agrees is the device tests' question).
"""

from __future__ import annotations

import re
import struct

MASK = 0xFFFFFFFF


def _bf16_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def _float_to_bf16(value: float) -> int:
    """Round to nearest even (through fp32, exact for the products here), subnormals kept."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def _prmt(a: int, b: int, selector: int) -> int:
    source = (b << 32) | a
    out = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = (source >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    halves = []
    for shift in (0, 16):
        x, y, z = ((v >> shift) & 0xFFFF for v in (a, b, c))
        halves.append(_float_to_bf16(_bf16_to_float(x) * _bf16_to_float(y) + _bf16_to_float(z)))
    return halves[0] | (halves[1] << 16)


def run(asm: str, inputs: dict[int, int], outputs: int) -> list[int]:
    """Execute `asm` (a Triton inline-asm string: operands $0… are outputs, then inputs) → the output registers."""
    regs: dict[str, int] = {f"${n}": v & MASK for n, v in inputs.items()}

    def value(token: str) -> int:
        token = token.strip()
        if token in regs:
            return regs[token]
        return int(token, 16) if token.lower().startswith("0x") else int(token)

    for line in asm.strip().strip("{}").split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dest, *args = [part.strip() for part in rest.split(",")]
        v = [value(a) for a in args]
        if op == "mov.b32":
            result = v[0]
        elif op == "prmt.b32":
            result = _prmt(v[0], v[1], v[2])
        elif op == "and.b32":
            result = v[0] & v[1]
        elif op == "or.b32":
            result = v[0] | v[1]
        elif op == "shl.b32":
            result = v[0] << v[1]
        elif op == "mul.lo.u32":
            result = v[0] * v[1]
        elif op == "fma.rn.bf16x2":
            result = _fma_bf16x2(*v)
        else:
            raise NotImplementedError(f"PTX model: {op}")
        if not re.fullmatch(r"\$?\w+", dest):
            raise ValueError(f"PTX model: destination {dest!r}")
        regs[dest] = result & MASK
    return [regs[f"${n}"] for n in range(outputs)]
