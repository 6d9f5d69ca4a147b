"""Compiling and loading the native CPU kernels, with run-time dispatch on the CPU's features.

Every C kernel file is built once per (source, instruction set) with the system C compiler, cached
under `cache_dir()/kernels`, and loaded with ctypes. The instruction set is chosen at run time from
what the CPU reports, so a kernel never runs an instruction the machine lacks:

- `portable`: plain C (`-O3`, no vector extensions beyond the x86-64 / aarch64 baseline);

on x86-64:
- `avx2`: AVX2 + FMA + F16C (Haswell, Zen);
- `avxvnni`: `avx2` plus AVX-VNNI's 256-bit integer dot products (Alder Lake and later desktops and laptops,
  which have no AVX-512);
- `avx512`: AVX-512 F/BW/VL/DQ (Skylake-X and later, Zen 4);
- `avx512vnni`: `avx512` plus VNNI integer dot products (Cascade Lake, Ice Lake, Zen 4), and AMX tiles where the
  CPU has them (`amx_cpu.h` decides at run time);
- `avx512bf16`: `avx512vnni` plus AVX512-BF16's bf16 dot products (Zen 4 and later, Cooper Lake, Sapphire Rapids and
  later), which attention over a bf16 KV cache runs on;

on aarch64 (Linux on Graviton, Ampere, a Raspberry Pi 5, Docker on an Apple-silicon Mac; macOS itself):
- `dotprod`: Armv8.2's int8 dot products (`sdot`, the `asimddp` feature: every Apple M chip, Neoverse N1 and
  later, Cortex-A76 and later);
- `i8mm`: `dotprod` plus the int8 matrix multiply (`smmla`: Apple M2 and later, Graviton 3 and later, Neoverse V1/N2)
  for a prompt's MoE products.

C sources select their code paths with the compiler's own macros (`__AVX2__`, `__AVXVNNI__`, `__AVX512F__`,
`__AVX512VNNI__`, `__AVX512BF16__`, `__ARM_FEATURE_DOTPROD`), so one file serves every variant and the portable path is always there.
The variants are listed in order of preference: the last one the CPU supports is used. A compiler without OpenMP
(Apple's clang) still builds every kernel, for one thread (the `omp` pragmas are all the kernels ask of OpenMP), and
a variant the compiler cannot build gives way to the next weaker one (`load_selected`).

`OSSRUN_CPU_ISA=<variant>` forces a variant (one the CPU lacks is refused, and
the best supported one is used instead, with a warning); `OSSRUN_KERNELS=0` turns every native
kernel off (the PyTorch reference runs everywhere).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from ossrun.paths import cache_dir

log = logging.getLogger(__name__)

# In order of preference (the last supported one is chosen). Each variant: the CPU features it needs (as Linux's
# /proc/cpuinfo names them), and the compiler flags that enable it.
Variants = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
X86_VARIANTS: Variants = {
    "portable": ((), ()),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
    "avxvnni": (("avx2", "fma", "f16c", "avx_vnni"), ("-mavx2", "-mfma", "-mf16c", "-mavxvnni")),
    "avx512": (("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
               ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")),
    "avx512vnni": (("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"),
                   ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni")),
    "avx512bf16": (("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"),
                   ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
                    "-mavx512bf16")),
}
ARM_VARIANTS: Variants = {
    "portable": ((), ()),
    "dotprod": (("asimddp",), ("-march=armv8.2-a+dotprod",)),
    "i8mm": (("asimddp", "i8mm"), ("-march=armv8.2-a+dotprod+i8mm",)),
}


def architecture(machine: str | None = None) -> str:
    """"x86_64", "aarch64" or the machine's own name (which gets only the portable variant)."""
    name = (machine or platform.machine()).lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def isa_variants(machine: str | None = None) -> Variants:
    """The kernel variants of an architecture (`machine`: platform.machine()'s spelling; default this one's)."""
    return {"x86_64": X86_VARIANTS, "aarch64": ARM_VARIANTS}.get(architecture(machine), {"portable": ((), ())})


def compile_flags(isa: str, machine: str | None = None, openmp: bool = True) -> list[str]:
    """The compiler's flags for a shared library of `isa` (a variant of `machine`'s architecture)."""
    return ["-O3", *(["-fopenmp"] if openmp else []), "-shared", "-fPIC", *isa_variants(machine)[isa][1]]


# macOS names Arm features in sysctl (`hw.optional.arm.FEAT_…`, 1 where the CPU has it): Linux's names for them.
DARWIN_FEATURES = {"hw.optional.arm.FEAT_DotProd": "asimddp", "hw.optional.arm.FEAT_I8MM": "i8mm"}


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's features as Linux's /proc/cpuinfo names them ("flags" on x86, "Features" on Arm; empty where
    neither can be read). On macOS, Apple silicon's are asked of sysctl and given Linux's names."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            answer = subprocess.run(["sysctl", *DARWIN_FEATURES], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        values = dict(line.split(": ", 1) for line in answer.stdout.splitlines() if ": " in line)
        return frozenset(name for key, name in DARWIN_FEATURES.items() if values.get(key, "").strip() == "1")
    return frozenset()


def supported_isas() -> list[str]:
    """Every variant this CPU can run, weakest first (always at least `portable`)."""
    flags = cpu_flags()
    return [name for name, (needs, _) in isa_variants().items() if all(f in flags for f in needs)]


def selected_isa() -> str:
    """The variant kernels use: the best supported one, or `OSSRUN_CPU_ISA` if the CPU has it."""
    supported = supported_isas()
    forced = os.environ.get("OSSRUN_CPU_ISA")
    if forced:
        if forced in supported:
            return forced
        log.warning("OSSRUN_CPU_ISA=%s is not supported by this CPU (%s); using %s", forced, ", ".join(supported), supported[-1])
    return supported[-1]


def kernels_enabled() -> bool:
    return os.environ.get("OSSRUN_KERNELS", "1") != "0"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def load_selected(source: Path, linked: tuple[Path, ...] = ()) -> ctypes.CDLL | None:
    """`source` built for the selected variant or, where the compiler cannot build that one (an older compiler
    without one of its flags, clang and a construct only gcc takes), the next weaker variant this CPU runs, down to
    portable, with a warning: a compiler's gap costs some speed, never every native kernel. None if none builds,
    said in one warning a kernel (each variant's compiler output or traceback is logged at info: `-v`)."""
    variants = supported_isas()
    chosen = selected_isa()
    for isa in [chosen, *reversed(variants[:variants.index(chosen)])]:
        lib = load_library(source, isa, linked)
        if lib is not None:
            if isa != chosen:
                log.warning("%s: the %s variant did not build; using %s", source.name, chosen, isa)
            return lib
    if (source, chosen) in _failures:  # not when there is no compiler: that was said once for every kernel
        _warn_once(f"{source.name} did not build ({_failures[source, chosen]}); it runs on PyTorch (-v shows why)")
    return None


NO_COMPILER = "no C compiler (cc/gcc or $CC): native kernels off, --precision fast runs on PyTorch; install gcc"
_failures: dict[tuple[Path, str], str] = {}  # why a (source, variant) did not build, in one line


@cache
def _warn_once(message: str) -> None:
    """A warning said once a process: every kernel and variant, on every load, would repeat it."""
    log.warning(message)


def _failed(source: Path, isa: str, reason: str, detail: str = "", exc_info: bool = False) -> None:
    """Note why `source` did not build for `isa` (`load_selected` warns once a kernel); the detail at info."""
    _failures[source, isa] = reason
    log.info("%s (%s) %s%s", source.name, isa, reason, detail, exc_info=exc_info)


@cache
def load_library(source: Path, isa: str, linked: tuple[Path, ...] = ()) -> ctypes.CDLL | None:
    """Build (once, cached by source hash and variant) and load `source` for `isa`; None if it cannot be built.

    `linked`: other kernel sources compiled into the same library, so `source` can call their exported
    functions directly (each keeps its own static helpers). The caller declares argtypes/restype. A
    broken toolchain never breaks the model: it logs and returns None, and the caller falls back to
    the PyTorch path.
    """
    compiler = _compiler()
    if compiler is None:
        _warn_once(NO_COMPILER)
        return None
    flags = compile_flags(isa)
    text = b"".join(path.read_bytes() for path in (source, *linked))
    for header in sorted(source.parent.glob("*.h")):  # shared headers are part of what is built
        text += header.read_bytes()
    digest = hashlib.sha256(text + " ".join(flags).encode() + platform.machine().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{isa}-{digest}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                sources = [str(source), *map(str, linked)]
                result = subprocess.run([compiler, *flags, *sources, "-o", str(built), "-lm"], capture_output=True, text=True)
                if result.returncode != 0:  # a compiler without OpenMP (Apple's clang): the kernels on one thread
                    alone = compile_flags(isa, openmp=False)
                    retry = subprocess.run([compiler, *alone, "-Wno-unknown-pragmas", *sources, "-o", str(built), "-lm"],
                                           capture_output=True, text=True)
                    if retry.returncode != 0:
                        lines = result.stderr.strip().splitlines() or ["no output"]
                        first = next((line for line in lines if "error" in line), lines[0])
                        return _failed(source, isa, f"{compiler} failed: {first[:200]}", ":\n" + "\n".join(lines)[:4000])
                    log.warning("%s (%s): the compiler has no OpenMP (%s); the kernel runs on one thread",
                                source.name, isa, result.stderr.strip()[:200])
                built.replace(target)  # atomic: concurrent first uses never load a half-written file
        return ctypes.CDLL(str(target))
    except Exception as exc:  # a compiler that cannot be run ($CC misspelt), an unwritable cache, a library that does not load
        return _failed(source, isa, f"{type(exc).__name__}: {exc}", exc_info=True)
