"""The aarch64 builds of the CPU kernels, run on this x86 machine under qemu's user-mode emulation.

`build_arm_libraries` compiles every Arm variant (`build.ARM_VARIANTS`) with Debian's cross compiler and the flags
`build.compile_flags` gives a real Arm machine, linked as `blocks_cpu.py` links them, and `tests/native/kernel_call.c`
(an aarch64 program) that calls one exported function on arguments passed through files. Used by
tests/test_arm_kernels.py (outputs against the x86 tests' references) and bench/arm_kernels.py (instructions
executed, counted by qemu: emulation says nothing of time).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from ossrun.model.kernels import blocks_cpu, build

CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64")
SYSROOT = Path("/usr/aarch64-linux-gnu")  # the cross toolchain's libc, libgomp and loader, which qemu runs with
MISSING = None if CROSS and QEMU and SYSROOT.is_dir() else \
    "no aarch64 cross compiler and qemu here (Debian: gcc-aarch64-linux-gnu, qemu-user; .ci/run installs them)"


class ArmLibrary:
    """One aarch64 build of the kernels, called through kernel_call under qemu: `call(function, *arguments)` with
    tensors (their bytes go in, and come back into the same tensors), ints, floats or None (a null pointer)."""

    def __init__(self, library: Path, caller: Path, workdir: Path):
        self.library, self.caller, self.workdir = library, caller, workdir
        self.calls = 0
        self.text = text_section(library)

    def call(self, function: str, *arguments) -> int:
        return self._run(function, arguments, count=False)[0]

    def count(self, function: str, *arguments) -> tuple[int, int]:
        """→ (status, aarch64 instructions executed inside this library by the call): qemu logs every instruction
        (one per translation block, unchained) and those whose address lies in the library's code are counted."""
        return self._run(function, arguments, count=True)

    def _run(self, function: str, arguments: tuple, count: bool) -> tuple[int, int]:
        self.calls += 1
        folder = self.workdir / f"call{self.calls}"
        folder.mkdir()
        lines, tensors = [], {}
        for k, value in enumerate(arguments):
            if value is None:
                lines.append("n")
            elif isinstance(value, torch.Tensor):
                assert value.is_contiguous() and value.device.type == "cpu"
                (folder / f"a{k}").write_bytes(ctypes.string_at(value.data_ptr(), value.numel() * value.element_size()))
                lines.append(f"p a{k}")
                tensors[k] = value
            elif isinstance(value, float):
                lines.append(f"f {value!r}")
            else:
                lines.append(f"i {int(value)}")
        (folder / "args").write_text("\n".join(lines) + "\n")
        command = [QEMU, "-L", str(SYSROOT)]
        pcs: dict[int, int] = {}
        if count:
            trace = folder / "trace"
            os.mkfifo(trace)
            command += ["-singlestep", "-d", "nochain,exec", "-D", str(trace)]
        process = subprocess.Popen([*command, str(self.caller), str(self.library), function, str(folder)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if count:
            reader = threading.Thread(target=count_by_address, args=(trace, pcs))
            reader.start()
        stdout, stderr = process.communicate(timeout=1800)
        if count:
            reader.join()
        assert process.returncode == 0, stderr
        for k, tensor in tensors.items():
            data = (folder / f"a{k}.out").read_bytes()
            ctypes.memmove(tensor.data_ptr(), data, len(data))
        shutil.rmtree(folder)
        instructions = 0
        if count:
            base = int(re.search(r"library at (0x[0-9a-f]+)", stderr).group(1), 16)
            instructions = sum(n for pc, n in pcs.items() if self.text[0] <= pc - base < self.text[1])
        return int(stdout.split()[-1]), instructions


def count_by_address(trace: Path, pcs: dict[int, int]) -> None:
    """Executions per guest address from qemu's exec log (`Trace N: host [flags/guest pc/...]`, one line per
    instruction with -singlestep and nochain), read as it is written."""
    with open(trace, "rb") as log:
        for line in log:
            start = line.find(b"/")
            if start > 0:
                pc = int(line[start + 1:line.find(b"/", start + 1)], 16)
                pcs[pc] = pcs.get(pc, 0) + 1


def text_section(library: Path) -> tuple[int, int]:
    """[start, end) of the library's .text, as offsets from its load address."""
    listing = subprocess.run(["aarch64-linux-gnu-readelf", "-SW", str(library)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"\.text\s+PROGBITS\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", listing)
    start = int(match.group(1), 16)
    return start, start + int(match.group(2), 16)


def build_arm_libraries(folder: Path) -> dict[str, ArmLibrary]:
    """Each Arm variant built as a real Arm machine would build it, in `folder`."""
    caller = folder / "kernel_call"
    native = Path(__file__).parent / "native" / "kernel_call.c"
    subprocess.run([CROSS, "-O1", str(native), "-o", str(caller), "-ldl"], check=True)
    libraries = {}
    for isa in build.ARM_VARIANTS:
        library = folder / f"kernels-{isa}.so"
        sources = [str(blocks_cpu._SOURCE), *map(str, blocks_cpu._LINKED)]
        subprocess.run([CROSS, *build.compile_flags(isa, machine="aarch64"), *sources, "-o", str(library), "-lm"], check=True)
        libraries[isa] = ArmLibrary(library, caller, folder)
    return libraries
