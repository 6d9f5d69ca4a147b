"""The two precisions: the flag reaches every layer, and the fast path stays close to the exact one."""

import pytest
import torch

from ossrun.engine.async_engine import resolve_dtype
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import GptOss


def test_precision_reaches_every_layer(checkpoints):
    model = GptOss.from_checkpoint(load_checkpoint(checkpoints["small_vocab_original"]), torch.float32, precision="fast")
    assert model.precision == "fast"
    assert all(b.precision == b.attn.precision == b.mlp.precision == "fast" for b in model.blocks)


def test_unknown_precision_is_refused(checkpoints):
    with pytest.raises(ValueError, match="precision"):
        GptOss.from_checkpoint(load_checkpoint(checkpoints["small_vocab_original"]), torch.float32, precision="fp8")


def test_dtype_defaults_from_the_precision():
    assert resolve_dtype("exact") == torch.float32
    assert resolve_dtype("fast") == torch.bfloat16
    assert resolve_dtype("exact", "bfloat16") == torch.bfloat16  # an explicit dtype wins
    with pytest.raises(ValueError):
        resolve_dtype("exact", "float16")


# ---------------------------------------------------------------------------------------------
# Fidelity. Two levels, each with a bound derived before measuring:
#
# 1. Every Q8 projection, on the inputs the exact model really feeds it: rounding a value to the
#    nearest step s of its block leaves an error uniform on ±s/2, variance s²/12, independent of
#    the others. For y = Ŵx̂ the expected squared error is then
#        E‖Δy‖² = Σ_{m,n,k} x_mk² s_w(n,k)²/12 + W_nk² s_x(m,k)²/12   (+ a product term ≪ both),
#    and with thousands of terms the measured error lands within a factor 2 of it (either way:
#    a broken kernel is far above, a silently unquantised one far below).
# 2. The whole model. On random checkpoints most of the logit error comes from discrete events
#    (a token routed to another expert, a SwiGLU clamp), not from smooth propagation, so the
#    yardstick is today's bf16 path, which is served and makes the same kind of events happen:
#    one Q8 rounding (RMS ≈ 2.5/(127·√12) ≈ 0.6% of a block's σ) is 2.5–5× one bf16 rounding
#    (0.1–0.2%), but the fast path rounds twice per matmul where bf16 rounds after every op, so
#    the two perturbations are of one order. Bounds: mean KL(exact‖fast) ≤ 4× bf16's, top-1
#    disagreement ≤ 2× bf16's (+3 binomial s.d.), max |Δlogit| ≤ 2× bf16's.
# ---------------------------------------------------------------------------------------------

from ossrun.model.attention import DenseAttention  # noqa: E402
from ossrun.model.checkpoint import write_random_checkpoint  # noqa: E402
from ossrun.model.config import PRESETS  # noqa: E402
from ossrun.model.dense import DenseLinear  # noqa: E402
from ossrun.model.kernels import dense_cpu  # noqa: E402

needs_kernel = pytest.mark.skipif(not dense_cpu.q8_kernel_available(torch.device("cpu")), reason="no C compiler")


def dense_logits(model: GptOss, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(len(ids))
    return model(ids, positions, DenseAttention(torch.zeros(len(ids), dtype=torch.long), positions))


def random_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def expected_squared_error(x: torch.Tensor, layer: DenseLinear) -> float:
    """E‖Δy‖² of the Q8 product under independent uniform rounding (see the comment above)."""
    m, k = x.shape
    step_w = (layer.scales.double() * layer.scale).repeat_interleave(32, dim=1)  # [N, K]
    _, step_x = dense_cpu.quantize_activations(x)  # d = amax/127 is the step
    step_x = step_x.double().repeat_interleave(32, dim=1)  # [M, K]
    w = dense_cpu.Q8Weight(layer.values, layer.scales, layer.scale).dequantize().double()
    weight_part = (x.double() ** 2) @ (step_w ** 2).T / 12
    activation_part = (step_x ** 2) @ (w ** 2).T / 12
    return float((weight_part + activation_part).sum())


@needs_kernel
def test_every_q8_projection_errs_as_rounding_predicts(checkpoints):
    checkpoint = load_checkpoint(checkpoints["small_vocab_original"])
    exact = GptOss.from_checkpoint(checkpoint, torch.float32)
    fast = GptOss.from_checkpoint(checkpoint, torch.float32, precision="fast")
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module, args, output) -> None:
            inputs[name] = args[0].clone()
        return hook

    hooks = [module.register_forward_hook(keep_input(name)) for name, module in exact.named_modules() if isinstance(module, DenseLinear)]
    dense_logits(exact, random_ids(96, checkpoint.config.vocab_size))
    for hook in hooks:
        hook.remove()
    fast_layers = dict(fast.named_modules())
    assert len(inputs) == 2 * checkpoint.config.num_hidden_layers + 1  # qkv and out per layer, the unembedding
    for name, x in inputs.items():
        layer = fast_layers[name]
        assert layer.quantized, name
        measured = float(((layer(x) - dict(exact.named_modules())[name](x)).double() ** 2).sum())
        expected = expected_squared_error(x, layer)
        print(name, measured / expected)
        assert 0.5 * expected <= measured <= 2 * expected, (name, measured / expected)


def divergence(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Mean KL(reference‖other), top-1 disagreement and max |Δlogit| over positions."""
    log_p, log_q = reference.log_softmax(-1), other.float().log_softmax(-1)
    return {"kl": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
            "disagree": float((reference.argmax(-1) != other.argmax(-1)).float().mean()),
            "max_abs": float((reference - other).abs().max())}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    return write_random_checkpoint(PRESETS["small"], tmp_path_factory.mktemp("small") / "small", "original", seed=1)


@needs_kernel
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_fast_model_within_the_bf16_yardstick(preset, checkpoints, small_checkpoint):
    """The served fast path (Q8 dense, int8 MoE activations, bf16 activations) against exact fp32."""
    checkpoint = load_checkpoint(checkpoints["original"] if preset == "tiny" else small_checkpoint)
    positions = 256 if preset == "tiny" else 128
    ids = random_ids(positions, checkpoint.config.vocab_size)
    exact = dense_logits(GptOss.from_checkpoint(checkpoint, torch.float32), ids)
    bf16 = divergence(exact, dense_logits(GptOss.from_checkpoint(checkpoint, torch.bfloat16), ids))
    fast = divergence(exact, dense_logits(GptOss.from_checkpoint(checkpoint, torch.bfloat16, precision="fast"), ids))
    noise = 3 * (max(bf16["disagree"], 1 / positions) * (1 - bf16["disagree"]) / positions) ** 0.5
    print(f"{preset}: bf16 {bf16}, fast {fast}")
    assert fast["kl"] <= 4 * bf16["kl"], (fast, bf16)
    assert fast["disagree"] <= 2 * bf16["disagree"] + noise, (fast, bf16)
    assert fast["max_abs"] <= 2 * bf16["max_abs"], (fast, bf16)


def cli_tokens(*args: str) -> list[int]:
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ossrun.cli", "generate", "--token-ids", "1,2,3", "--max-tokens", "6",
                             "--temperature", "0", "--json", *args], capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["token_ids"]


def engine_tokens(model: GptOss, kv_dtype: torch.dtype) -> list[int]:
    from ossrun.engine.engine import Engine, EngineOptions
    from ossrun.engine.request import Request, SamplingParams

    engine = Engine(model, EngineOptions(kv_dtype=kv_dtype, kv_cache_bytes=16 * 1024**2, max_model_len=1024))
    return [e.token_id for e in engine.generate([Request("x", [1, 2, 3], SamplingParams(max_tokens=6, temperature=0))])["x"]]


@pytest.mark.parametrize("args,dtype,precision", [
    (("--precision", "exact", "--dtype", "bfloat16"), torch.bfloat16, "exact"),  # what --dtype bfloat16 meant before the flag
    ((), torch.bfloat16, "fast"),  # the default: fast, bf16 activations and KV cache
])
def test_cli_builds_the_model_the_flags_name(checkpoints, args, dtype, precision):
    path = checkpoints["small_vocab_original"]
    expected = engine_tokens(GptOss.from_checkpoint(load_checkpoint(path), dtype, precision=precision), dtype)
    assert cli_tokens("--model", str(path), *args) == expected


# ---------------------------------------------------------------------------------------------
# The native blocks (`kernels/blocks_cpu.c`): the served fast path on the CPU runs every block of a
# paged step in one C call on fp32 activations. Same quantised arithmetic as the fast modules, so
# it must stand against exact fp32 by the same yardstick, and the modules (with fp32 activations
# and KV) must be no further from it than they are from exact.
# ---------------------------------------------------------------------------------------------

from ossrun.model.attention import PagedAttention, PagedGroup  # noqa: E402
from ossrun.model.kernels.attention_cpu import paged_attention_cpu  # noqa: E402
from ossrun.model.lora import LoraAdapter, LoraBatch, load_peft_adapter, write_random_adapter  # noqa: E402


def paged_logits(model: GptOss, ids: torch.Tensor, chunk: int, kv_dtype: torch.dtype = torch.float32,
                 native: bool = True, lora: LoraAdapter | None = None) -> torch.Tensor:
    """Logits at every position of one sequence prefilled `chunk` tokens a step over a paged cache (block 0 null),
    with the CPU attention kernel, through the native blocks or (native=False) the modules; every row on `lora`."""
    c, block = model.config, 16
    blocks = (len(ids) + block - 1) // block + 1
    caches = [(torch.zeros(blocks, block, c.num_key_value_heads, c.head_dim, dtype=kv_dtype),
               torch.zeros(blocks, block, c.num_key_value_heads, c.head_dim, dtype=kv_dtype)) for _ in model.blocks]
    table = torch.arange(1, blocks).unsqueeze(0)
    saved, model.native = model.native, model.native if native else None
    try:
        rows = []
        for begin in range(0, len(ids), chunk):
            positions = torch.arange(begin, min(begin + chunk, len(ids)))
            group = PagedGroup(table[0, positions // block] * block + positions % block, table, torch.zeros(1, dtype=torch.long),
                               torch.tensor([positions[-1].item() + 1]))
            attention = PagedAttention(caches, block, {"full": group, "sliding": group}, [0], [len(positions)], positions,
                                       kernel=paged_attention_cpu)
            attention.prepare()
            batch = None if lora is None else LoraBatch([(torch.arange(len(positions)), lora)])
            rows.append(model(ids[positions], positions, attention, lora=batch))
        return torch.cat(rows)
    finally:
        model.native = saved


@needs_kernel
def test_fast_model_builds_native_blocks_and_exact_does_not(checkpoints):
    checkpoint = load_checkpoint(checkpoints["small_vocab_original"])
    assert GptOss.from_checkpoint(checkpoint, torch.bfloat16, precision="fast").native is not None
    assert GptOss.from_checkpoint(checkpoint, torch.float32, precision="exact").native is None
    assert not GptOss.from_checkpoint(checkpoint, torch.float32, precision="fast").native.accepts(DenseAttention(torch.zeros(1), torch.zeros(1)))


@needs_kernel
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_native_blocks_within_the_bf16_yardstick(preset, checkpoints, small_checkpoint):
    """Prefilled in chunks of 48 (every chunk after the first reads a cached prefix, and the sliding layers' window
    of 128 is crossed on tiny), bf16 KV as served."""
    checkpoint = load_checkpoint(checkpoints["original"] if preset == "tiny" else small_checkpoint)
    positions = 256 if preset == "tiny" else 128
    ids = random_ids(positions, checkpoint.config.vocab_size)
    exact = dense_logits(GptOss.from_checkpoint(checkpoint, torch.float32), ids)
    bf16 = divergence(exact, dense_logits(GptOss.from_checkpoint(checkpoint, torch.bfloat16), ids))
    native = divergence(exact, paged_logits(GptOss.from_checkpoint(checkpoint, torch.bfloat16, precision="fast"), ids, 48,
                                            torch.bfloat16))
    noise = 3 * (max(bf16["disagree"], 1 / positions) * (1 - bf16["disagree"]) / positions) ** 0.5
    print(f"{preset}: bf16 {bf16}, native {native}")
    assert native["kl"] <= 4 * bf16["kl"], (native, bf16)
    assert native["disagree"] <= 2 * bf16["disagree"] + noise, (native, bf16)
    assert native["max_abs"] <= 2 * bf16["max_abs"], (native, bf16)


@needs_kernel
def test_native_blocks_compute_what_the_fast_modules_compute(checkpoints):
    """fp32 activations and KV on both sides: the same quantised products, summed in another order, so they differ
    only where a value crosses an int8 rounding step. Each is much closer to the other than to exact fp32."""
    checkpoint = load_checkpoint(checkpoints["original"])
    ids = random_ids(200, checkpoint.config.vocab_size, seed=3)
    model = GptOss.from_checkpoint(checkpoint, torch.float32, precision="fast")
    native, modules = paged_logits(model, ids, 64), paged_logits(model, ids, 64, native=False)
    exact = dense_logits(GptOss.from_checkpoint(checkpoint, torch.float32), ids)
    between, from_exact = divergence(modules, native), divergence(exact, modules)
    print(between, from_exact)
    assert between["kl"] <= from_exact["kl"] / 4, (between, from_exact)
    assert between["disagree"] <= from_exact["disagree"] / 2 + 0.01, (between, from_exact)


@needs_kernel
@pytest.mark.parametrize("rank, targets", [(8, ("q_proj", "k_proj", "v_proj", "o_proj")), (4, ("q_proj", "v_proj"))])
def test_native_blocks_add_lora_as_the_modules_do(checkpoints, tmp_path, rank, targets):
    """LoRA rows run in the native call too (fp32 A and B, as the engine loads them for this model). Against the
    modules with the same adapter, both on fp32 activations and KV, they differ only as the two paths do without an
    adapter (summation order, int8 rounding steps), far less than the adapter changes the output."""
    checkpoint = load_checkpoint(checkpoints["original"])
    model = GptOss.from_checkpoint(checkpoint, torch.float32, precision="fast")
    path = write_random_adapter(checkpoint.config, tmp_path / "adapter", rank=rank, seed=1, targets=targets)
    adapter = load_peft_adapter(path, checkpoint.config, "adapter", model.adapter_dtype)
    ids = random_ids(200, checkpoint.config.vocab_size, seed=3)
    native, modules = paged_logits(model, ids, 64, lora=adapter), paged_logits(model, ids, 64, native=False, lora=adapter)
    base_native = paged_logits(model, ids, 64)
    base = divergence(paged_logits(model, ids, 64, native=False), base_native)
    between, effect = divergence(modules, native), divergence(base_native, native)
    print(between, base, effect)
    assert between["kl"] <= 2 * base["kl"] + 1e-9 and between["max_abs"] <= 2 * base["max_abs"] + 1e-5, (between, base)
    assert between["kl"] <= effect["kl"] / 100, (between, effect)
