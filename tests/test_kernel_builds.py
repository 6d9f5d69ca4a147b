"""Every native kernel source compiles for every variant of both architectures, with each C compiler at hand.

The kernel tests build only the variants this CPU runs, with the machine's `cc`. Users' machines have others:
clang (macOS, some distributions), CPUs with other features, Arm. Each compiler has its own gaps (clang refused a
shuffle whose immediate was a conditional, and an AMX instruction in an OpenMP region's body; neither showed with
gcc), so each (compiler, architecture, variant, source) is compiled here with the flags `build.compile_flags`
gives a real machine of that kind. Compiling is all: what runs is tested elsewhere (x86 here, Arm under qemu). Also here: how a machine's features
choose the variants (Linux's /proc/cpuinfo on both architectures, sysctl on macOS).
`.ci/run` installs clang and the aarch64 cross compiler; a compiler that is not here skips, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ossrun.model.kernels import build

KERNELS = Path(build.__file__).parent
SOURCES = sorted(path.name for path in KERNELS.glob("*.c"))
HOST_X86 = build.architecture() == "x86_64"
# (name, command, architecture it targets): the host's compilers target x86 only on an x86 host
COMPILERS = [
    ("gcc", ["gcc"], "x86_64"),
    ("clang", ["clang"], "x86_64"),
    ("aarch64-linux-gnu-gcc", ["aarch64-linux-gnu-gcc"], "aarch64"),
    ("clang-aarch64", ["clang", "--target=aarch64-linux-gnu"], "aarch64"),
]
CASES = [(name, arch, isa) for name, _, arch in COMPILERS for isa in build.isa_variants(arch)]


def command_for(name: str) -> list[str] | None:
    for compiler, command, arch in COMPILERS:
        if compiler == name:
            if shutil.which(command[0]) is None or (arch == "x86_64" and not command[0].startswith("aarch64") and not HOST_X86):
                return None
            return command
    return None


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name,arch,isa", CASES)
def test_kernel_compiles(name, arch, isa, source, tmp_path):
    command = command_for(name)
    if command is None:
        pytest.skip(f"no {name} here (Debian: clang, gcc-aarch64-linux-gnu; .ci/run installs them)")
    flags = [f for f in build.compile_flags(isa, machine=arch) if f not in ("-shared", "-O3")] + ["-O1"]  # -O1: half the time
    result = subprocess.run([*command, *flags, "-c", str(KERNELS / source), "-o", str(tmp_path / "kernel.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_variants_are_chosen_by_the_cpu_features_linux_reports_on_arm():
    """/proc/cpuinfo on Arm says "Features", with `asimddp` where the CPU has sdot (every Apple M chip, Graviton 2+)."""
    assert build.isa_variants("aarch64") is build.ARM_VARIANTS and build.isa_variants("arm64") is build.ARM_VARIANTS
    assert build.isa_variants("x86_64") is build.X86_VARIANTS and list(build.isa_variants("riscv64")) == ["portable"]
    assert "-march=armv8.2-a+dotprod" in build.compile_flags("dotprod", machine="aarch64")


def test_apple_silicon_features_come_from_sysctl(monkeypatch):
    """macOS has no /proc/cpuinfo: `sysctl hw.optional.arm.FEAT_DotProd hw.optional.arm.FEAT_I8MM` answers (as an M2
    does: `name: 1` a line; an M1 says 0 for i8mm), given Linux's names, so the variants are chosen as on Linux."""
    def no_cpuinfo(self, *args, **kwargs):
        raise OSError("no /proc on macOS")

    answers = {"M2": "hw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_I8MM: 1\n",
               "M1": "hw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_I8MM: 0\n"}
    monkeypatch.setattr(Path, "read_text", no_cpuinfo)
    monkeypatch.setattr(build.platform, "system", lambda: "Darwin")
    for chip, expected in (("M2", {"asimddp", "i8mm"}), ("M1", {"asimddp"})):
        monkeypatch.setattr(build.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 0, answers[chip], ""))
        assert build.cpu_flags.__wrapped__() == expected


def _included(source: Path) -> set[str]:
    """The files `source` names in `#include "..."` (the package's own headers; `<...>` ones are the system's)."""
    return set(re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read_text(), re.MULTILINE))


def test_package_data_ships_every_file_a_kernel_includes():
    """Hunt round 12 C-F2: package-data listed `*.c` only, so `pip install .` (a wheel) shipped the kernels without
    the headers they include, and every fast CPU kernel but one failed to compile there (the PyTorch fallbacks ran)."""
    config = tomllib.loads((KERNELS.parents[2] / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["ossrun.model.kernels"]
    shipped = {path.relative_to(KERNELS).as_posix() for pattern in patterns for path in KERNELS.glob(pattern)}
    needed, todo = set(SOURCES), list(SOURCES)
    while todo:  # headers that include headers: every file a build reads
        for name in _included(KERNELS / todo.pop()) - needed:
            needed.add(name)
            todo.append(name)
    assert needed - set(SOURCES), "no kernel includes a header: the test reads the sources wrong"
    assert needed <= shipped, f"not in the package data {patterns}: {sorted(needed - shipped)}"


def _generate_with(env: dict[str, str], checkpoint: Path, cache: Path) -> subprocess.CompletedProcess:
    """`ossrun generate` on the fast precision in a controlled environment, with a fresh kernel cache (nothing built)."""
    env = {"HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "OSSRUN_CACHE_DIR": str(cache), **env}
    return subprocess.run([sys.executable, "-m", "ossrun.cli", "generate", "--model", str(checkpoint), "--token-ids", "1,2",
                           "--max-tokens", "2", "--precision", "fast"], capture_output=True, text=True, timeout=300, env=env)


def test_no_compiler_is_one_warning_and_a_failing_one_a_line_a_kernel(checkpoints, tmp_path):
    """Hunt round 13 C-F9: without a C compiler the native kernels were skipped at info level only (the demo ran ~2×
    slower, unexplained), and a `CC` that cannot run printed ~25 tracebacks (one per kernel and variant)."""
    alone = _generate_with({"PATH": str(Path(sys.executable).parent)}, checkpoints["original"], tmp_path / "none")
    assert alone.returncode == 0, alone.stderr
    assert alone.stderr.count("WARNING") == 1 and build.NO_COMPILER in alone.stderr, alone.stderr
    broken = _generate_with({"PATH": "/usr/bin:/bin", "CC": "/nonexistent/cc"}, checkpoints["original"], tmp_path / "broken")
    assert broken.returncode == 0, broken.stderr
    warned = [line.split("WARNING ossrun.model.kernels.build: ")[1].split()[0] for line in broken.stderr.splitlines() if "WARNING" in line]
    assert warned and len(warned) == len(set(warned)) and set(warned) <= set(SOURCES), broken.stderr  # one line a kernel
    assert "did not build (FileNotFoundError" in broken.stderr and "Traceback" not in broken.stderr, broken.stderr
