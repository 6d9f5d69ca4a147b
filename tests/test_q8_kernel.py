"""The Q8 dense kernel (kernels/q8_cpu.c) against its PyTorch reference, on every instruction set this CPU runs.

Bound for the product (derived, not fitted): each block's integer dot product is exact in int32
and in fp32 (|Σ| ≤ 32·127² < 2²⁴); the kernel then rounds the product of the two scales once and
accumulates ≤ K/32 block terms (plus a ≤ 16-lane horizontal sum) in fp32. With u = 2⁻²⁴ that is
|y − y_ref| ≤ (K/32 + 8)·u·Σ_k |ŵ_k x̂_k| + u·|y_ref|, with ŵ, x̂ the dequantised operands and
y_ref computed in float64.
"""

import shutil

import pytest
import torch
import torch.nn.functional as F

from ossrun.model.dense import DenseLinear
from ossrun.model.kernels import dense_cpu
from ossrun.model.kernels.build import supported_isas

ISAS = supported_isas()  # always includes "portable"
U = 2.0 ** -24


@pytest.fixture(autouse=True)
def kernel_available():
    if not dense_cpu.q8_kernel_available(torch.device("cpu")):
        pytest.skip("no C compiler: the Q8 kernel cannot be built")


def operands(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4  # rows of different scales
    x[:, :7] *= 30  # an outlier block, as real activations have
    return x, torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g)


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantisation_is_bit_exact(isa, monkeypatch):
    monkeypatch.setenv("OSSRUN_CPU_ISA", isa)
    x, _, _ = operands(9, 2880, 1, seed=1)
    x[3, 64:96] = 0  # an all-zero block: scale 0, values 0
    x[4, 32:64] = 0
    x[4, 32:36] = torch.tensor([127.0, 2.5, 3.5, -2.5])  # scale 1: exact halves round to even, as torch.round does
    q, d = dense_cpu.q8_quantize_activations(x)
    q_ref, d_ref = dense_cpu.quantize_activations(x)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref)
    assert q[4, 32:36].tolist() == [127, 2, 4, -2] and d[4, 1] == 1.0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("amx", ["1", "0"])
def test_a_non_finite_value_makes_its_row_nan(isa, amx, monkeypatch):
    """The scale's max ignored NaN and the int8 conversion saturated inf, so a broken row came out as plausible numbers
    (on the native blocks, which call the kernel directly, into the KV cache; hunt round 23 B-F1). Its block's scale is
    NaN, and so is every product of the row, as an unquantised product makes it; 33 rows take the AMX tiles."""
    monkeypatch.setenv("OSSRUN_CPU_ISA", isa)
    monkeypatch.setenv("OSSRUN_CPU_AMX", amx)
    x, w, b = operands(33, 2880, 40, seed=5)
    broken = [2, 17, 30]
    for row, value in zip(broken, (float("nan"), float("inf"), float("-inf"))):
        x[row, 100] = value
    _, d = dense_cpu.q8_quantize_activations(x)
    assert d[broken, 3].isnan().all() and int(torch.isfinite(d).sum()) == d.numel() - len(broken)
    y = dense_cpu.q8_linear(x, dense_cpu.quantize_weight(w), b)
    rest = [r for r in range(33) if r not in broken]
    assert y[broken].isnan().all() and torch.isfinite(y[rest]).all()


@pytest.mark.parametrize("isa", ISAS)
def test_a_block_too_small_to_invert_quantises_to_zero(isa, monkeypatch):
    """Below max |x| ≈ 3.7e-37 the inverse scale overflows: x · inf gave -128 on the SIMD variants (outside [-127, 127])
    and 0 on portable (hunt round 23 B-F2). Now 0 everywhere; a block just above still quantises as the reference does."""
    monkeypatch.setenv("OSSRUN_CPU_ISA", isa)
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(2))
    x[1, 32:64] = torch.linspace(-1e-40, 1e-40, 32)
    x[1, 64:96] = torch.linspace(-1e-36, 1e-36, 32)
    q, d = dense_cpu.q8_quantize_activations(x)
    q_ref, d_ref = dense_cpu.quantize_activations(x)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref)
    assert not q[1, 32:64].any() and q[1, 64:96].abs().max() == 127


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(1, 32, 3), (1, 96, 7), (3, 2880, 33), (4, 4096, 5), (5, 160, 64), (70, 64, 9), (131, 96, 4),
                                   (8, 96, 16), (67, 2880, 40), (19, 4096, 33)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_within_the_derived_bound(isa, m, k, n, with_bias, monkeypatch):
    """Row counts cross the 4-row micro-kernel and the 64-row chunk; odd block counts hit the AVX-512 tail. From 8
    activation rows and 16 weight rows AVX-512 VNNI takes the grouped product (16 weight rows a group, 4 activation
    rows a pass): the last shapes have whole groups, tails of weight rows (40 = 2·16 + 8) and of activation rows."""
    monkeypatch.setenv("OSSRUN_CPU_ISA", isa)
    monkeypatch.setenv("OSSRUN_CPU_AMX", "0")  # the AMX tiles have their own test, below
    check_linear(m, k, n, with_bias)


@pytest.mark.parametrize("amx", ["1", "0"])
@pytest.mark.parametrize("m,k,n", [(16, 2880, 16), (67, 2880, 40), (19, 4096, 33), (300, 96, 48)])
def test_many_rows_take_the_tiles_within_the_derived_bound(m, k, n, amx, monkeypatch):
    """From 16 activation rows, AMX (where the CPU has it and Linux grants it) multiplies 16 x 16 tiles a block at a
    time; without it the grouped VNNI product runs. Both within the bound, including tails of activation rows (not
    a multiple of 16: zero rows computed, never stored), of weight rows (the per-row kernel) and an odd block count."""
    monkeypatch.setenv("OSSRUN_CPU_ISA", ISAS[-1])
    monkeypatch.setenv("OSSRUN_CPU_AMX", amx)
    if amx == "1" and not dense_cpu.amx_active():
        pytest.skip("no AMX here (the CPU lacks AMX-INT8, Linux refused the tile state, or the variant is not avx512vnni or avx512bf16)")
    check_linear(m, k, n, with_bias=True)


def check_linear(m: int, k: int, n: int, with_bias: bool, linear=dense_cpu.q8_linear) -> None:
    """`linear(x, weight, bias)` (the kernel; tests/test_arm_kernels.py passes its Arm builds) within the bound."""
    x, w, b = operands(m, k, n, seed=m * 1000 + k + n)
    b = b if with_bias else None
    weight = dense_cpu.quantize_weight(w)
    got = linear(x, weight, b)
    ref = dense_cpu.q8_linear_reference(x, weight, b).double()
    xq, xd = dense_cpu.quantize_activations(x)
    x_hat = (xq.view(m, k // 32, 32).double() * xd.double().unsqueeze(-1)).view(m, k)
    magnitude = x_hat.abs() @ weight.dequantize().double().abs().T
    bound = (k // 32 + 8) * U * magnitude + U * ref.abs() + 1e-30
    assert ((got.double() - ref).abs() <= bound).all(), ((got.double() - ref).abs() / bound).max()


def test_reference_is_the_product_of_the_dequantised_operands():
    """The float64 reference equals x̂ Ŵᵀ + b: the kernel's only approximation is the rounding to int8."""
    x, w, b = operands(6, 256, 12, seed=3)
    weight = dense_cpu.quantize_weight(w)
    xq, xd = dense_cpu.quantize_activations(x)
    x_hat = (xq.view(6, 8, 32).float() * xd.unsqueeze(-1)).view(6, 256)
    assert torch.allclose(dense_cpu.q8_linear_reference(x, weight, b), F.linear(x_hat, weight.dequantize(), b), atol=1e-5)


def test_weights_round_to_the_nearest_step_of_their_block():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 128, generator=g)
    w[0] *= 1e-7  # tiny rows: the per-tensor power of two keeps their fp16 scales out of the subnormals
    w[1] = 0
    weight = dense_cpu.quantize_weight(w.bfloat16(), chunk_rows=16)  # several chunks
    assert weight.values.dtype == torch.int8 and weight.values.abs().max() <= 127
    step = (weight.scales.float() * weight.scale).repeat_interleave(32, dim=1)
    error = (weight.dequantize() - w.bfloat16().float()).abs()
    assert (error <= step * 0.5 * (1 + 1e-3) + 1e-30).all()
    amax = w.bfloat16().float().view(40, 4, 32).abs().amax(-1).repeat_interleave(32, dim=1)
    assert (step[0] / amax[0] * 127 - 1).abs().max() < 1e-3  # fp16 scale within its 11-bit precision
    assert (weight.dequantize()[1] == 0).all()


def test_without_kernels_the_fast_layer_keeps_full_precision(monkeypatch):
    monkeypatch.setenv("OSSRUN_KERNELS", "0")
    _, w, b = operands(1, 64, 8, seed=5)
    layer = DenseLinear(w, b, torch.float32, torch.device("cpu"), "fast")
    assert not layer.quantized and torch.equal(layer.weight, w)


def test_fast_layer_is_quantised_and_exact_layer_is_not():
    x, w, b = operands(2, 64, 8, seed=6)
    fast = DenseLinear(w, b, torch.float32, torch.device("cpu"), "fast")
    exact = DenseLinear(w, b, torch.float32, torch.device("cpu"), "exact")
    assert fast.quantized and not exact.quantized
    assert torch.equal(exact(x), F.linear(x, w, b))
    assert torch.allclose(fast(x), dense_cpu.q8_linear_reference(x, dense_cpu.quantize_weight(w), b), atol=1e-5)
    assert fast(x.bfloat16()).dtype == torch.bfloat16 and fast(x, torch.float32).dtype == torch.float32


def compiler_refusing(flags: str, tmp_path, monkeypatch) -> None:
    """CC is the machine's compiler, refusing the options a shell `case` pattern matches (as one that lacks them
    does), and kernels are built into a fresh cache."""
    real = shutil.which("cc") or shutil.which("gcc")
    compiler = tmp_path / "cc-refusing"
    compiler.write_text(f'#!/bin/sh\nfor a in "$@"; do case "$a" in {flags}) echo "unsupported option $a" >&2; exit 1;; esac; done\n'
                        f'exec {real} "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("OSSRUN_CACHE_DIR", str(tmp_path / "cache"))


def test_a_compiler_without_openmp_still_builds_the_kernel(tmp_path, monkeypatch, caplog):
    """Apple's clang refuses -fopenmp: the kernel is built without it (one thread) and computes the same products."""
    import ctypes

    from ossrun.model.kernels import build

    compiler_refusing("-fopenmp", tmp_path, monkeypatch)
    lib = build.load_library.__wrapped__(dense_cpu._SOURCE, "portable")  # not the cached library the other tests use
    assert lib is not None and "no OpenMP" in caplog.text
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.q8_linear.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_float, i64, ptr, ptr, ctypes.c_int]
    x, w, b = operands(5, 96, 7, seed=9)
    weight = dense_cpu.quantize_weight(w)
    y = torch.empty(5, 7)
    assert lib.q8_linear(x.data_ptr(), 5, 96, weight.values.data_ptr(), weight.scales.data_ptr(), weight.scale, 7, b.data_ptr(),
                         y.data_ptr(), 2) == 0
    assert torch.allclose(y, dense_cpu.q8_linear_reference(x, weight, b), rtol=1e-5, atol=1e-4)


def test_a_variant_the_compiler_cannot_build_falls_back_to_a_weaker_one(tmp_path, monkeypatch, caplog):
    """A compiler that refuses the selected variant's flags (an old one without -mavx512vnni, say) costs speed, not
    every native kernel: the next weaker variant that builds is used, with a warning."""
    from ossrun.model.kernels import build

    if build.selected_isa() == "portable":
        pytest.skip("this CPU runs only the portable variant: nothing weaker to fall back to")
    compiler_refusing("-m*|-march=*", tmp_path, monkeypatch)
    build.load_library.cache_clear()  # built anew with this compiler, and again with the real one by the tests after
    try:
        lib = build.load_selected(dense_cpu._SOURCE)
    finally:
        build.load_library.cache_clear()
    assert lib is not None and "-portable-" in lib._name
    assert f"the {build.selected_isa()} variant did not build; using portable" in caplog.text
