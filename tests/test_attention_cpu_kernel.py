"""The CPU paged-attention kernel against `attention_with_sinks` on dense keys, every instruction-set variant.

Each case builds a paged cache with shuffled physical blocks, the block tables the engine would
pass, and an independent dense reference: per sequence, its keys in position order, the causal
(and windowed) mask from `visibility`, and `attention_with_sinks`. Blocks a sequence must not read
(table padding, the null block, blocks the window released, slots past a context) hold NaN, so using one shows.

Tolerance: float32 throughout, |q|, |k|, |v| ~ 1. The kernel sums in a different order (per key
block, with online-softmax rescaling) and its exp is a ~1-ulp polynomial, so each output differs from
torch's by a few ulps per accumulated term (5e-7 measured); 1e-5 absolute (about 80 ulps at 1.0) bounds that for the
few hundred keys here with room, while a wrong mask, sink or block gives errors of order 0.1.

The avx512bf16 variant over a bf16 cache rounds the query (times the scale) and the softmax weights to bf16 (its
products run on bf16 pairs). Its reference takes the same rounded queries, so the scores agree as before; rounding a
weight moves it by at most 2^-8 of itself, so an output element moves by at most 2^-8 of the same attention over
|v| (each weight times its |v_j|), which `check` adds to its bound, per element.
"""

from __future__ import annotations

import random

import pytest
import torch

from ossrun.model.attention import attention_with_sinks, visibility
from ossrun.model.kernels.attention_cpu import _library, paged_attention_cpu
from ossrun.model.kernels.build import supported_isas

ATOL = 1e-5
BF16_UNIT = 2.0 ** -8  # bf16 keeps 8 significant bits: round to nearest moves a value by at most 2^-8 of itself
POISON = float("nan")  # what unreadable blocks and unwritten slots hold: a kernel that uses one, even times a zero
# weight (0 x NaN is NaN), gives NaN, as a real cache's unwritten memory could

pytestmark = pytest.mark.skipif(_library("portable") is None, reason="no C compiler: the kernel is not built")


def make_case(contexts: list[int], new: list[int], *, window: int | None, n_kv: int = 2, group: int = 4, dim: int = 16,
              block_size: int = 16, cache_dtype: torch.dtype = torch.float32, sink_shift: float = 0.0, seed: int = 0):
    """Sequences with `contexts[b]` tokens after the step, the last `new[b]` of them queried this step."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    n_heads = n_kv * group
    blocks_per_seq = [-(-c // block_size) for c in contexts]
    physical = list(range(1, 1 + sum(blocks_per_seq) + 3))  # block 0 is the null block
    rng.shuffle(physical)
    shape = (len(physical) + 1, block_size, n_kv, dim)
    k_cache = torch.full(shape, POISON).to(cache_dtype)
    v_cache = torch.full(shape, POISON).to(cache_dtype)
    full_tables, cursor = [], 0
    for n in blocks_per_seq:
        full_tables.append(physical[cursor:cursor + n])
        cursor += n
    dense_k, dense_v = [], []
    for table, length in zip(full_tables, contexts):
        k = torch.randn(length, n_kv, dim, generator=g).to(cache_dtype)
        v = torch.randn(length, n_kv, dim, generator=g).to(cache_dtype)
        for p in range(length):
            k_cache[table[p // block_size], p % block_size] = k[p]
            v_cache[table[p // block_size], p % block_size] = v[p]
        dense_k.append(k.float())
        dense_v.append(v.float())
    firsts, tables = [], []
    for table, length, n in zip(full_tables, contexts, new):
        begin = length - n
        first = max(0, begin - window + 1) // block_size if window else 0
        for released in table[:first]:  # what the window gave back may hold anything by now
            k_cache[released] = POISON
            v_cache[released] = POISON
        firsts.append(first)
        tables.append(table[first:])
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(sum(new), n_heads, dim, generator=g)
    sinks = torch.randn(n_heads, generator=g) + sink_shift
    starts = torch.tensor([sum(new[:b]) for b in range(len(new))])
    positions = torch.cat([torch.arange(c - n, c) for c, n in zip(contexts, new)])
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, query_starts=starts, query_lens=torch.tensor(new),
                positions=positions, block_tables=block_tables, first_block=torch.tensor(firsts),
                context_lens=torch.tensor(contexts), sinks=sinks, window=window, scale=dim ** -0.5), (dense_k, dense_v)


def reference(case: dict, dense: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
    """Per sequence: dense keys in position order, the mask from `visibility`, `attention_with_sinks`."""
    outs = []
    for b, (k, v) in enumerate(zip(*dense)):
        start, n = int(case["query_starts"][b]), int(case["query_lens"][b])
        q_pos = case["positions"][start:start + n]
        allowed = visibility(q_pos, torch.arange(k.shape[0]), case["window"])
        outs.append(attention_with_sinks(case["q"][None, start:start + n], k[None], v[None], case["sinks"], allowed[None],
                                         case["scale"])[0])
    return torch.cat(outs)


ISAS = supported_isas()


def rounds_to_bf16(case: dict, isa: str) -> bool:
    """Whether `isa` runs `case` on bf16 pairs: the avx512bf16 variant over a bf16 cache."""
    return isa == "avx512bf16" and case["k_cache"].dtype == torch.bfloat16


def check(case: dict, dense, isa: str, attend=paged_attention_cpu) -> float:
    """`attend(**case, isa=isa)` (the kernel; tests/test_arm_kernels.py passes its Arm builds) against the reference."""
    got = attend(**case, isa=isa)
    bound = torch.tensor(ATOL)
    if rounds_to_bf16(case, isa):
        case = dict(case, q=(case["q"] * case["scale"]).bfloat16().float() / case["scale"])
        bound = bound + BF16_UNIT * reference(case, (dense[0], [v.abs() for v in dense[1]]))
    want = reference(case, dense)
    assert got.shape == want.shape and got.dtype == torch.float32
    err = (got - want).abs()
    assert (err <= bound).all(), f"{isa}: max error {err.max().item()}, max excess over the bound {(err - bound).max().item()}"
    return err.max().item()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_decode_several_sequences(isa, cache_dtype):
    """One new token each, contexts from 1 token to several blocks, ragged tables padded with the null block."""
    check(*make_case([1, 17, 50, 16, 100], [1, 1, 1, 1, 1], window=None, cache_dtype=cache_dtype), isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_prefill_from_empty(isa, cache_dtype):
    """A whole prompt in one step: causal within the step, query tiles crossing block edges."""
    check(*make_case([77], [77], window=None, cache_dtype=cache_dtype, seed=1), isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("window", [None, 128])
def test_long_prefill_over_several_query_tiles(isa, window):
    """400 tokens x 4 heads a KV head: several of the kernel's 256-row jobs, each with its own key range (windowed:
    a later tile starts its keys where its first row's window does)."""
    check(*make_case([400], [400], window=window, dim=64, seed=13), isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("context,dim", [(130, 16), (700, 16), (300, 64)])  # 700 / 300: several of the kernel's key chunks
def test_chunked_prefill_over_a_cached_prefix(isa, context, dim):
    """A chunk of 40 tokens after a cached prefix: the chunk sees the prefix and its own past."""
    check(*make_case([context, 9], [40, 1], window=None, dim=dim, seed=2), isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_mixed_decodes_and_prefill_chunks_in_one_call(isa, cache_dtype):
    check(*make_case([5, 200, 33, 64, 150], [5, 1, 20, 1, 64], window=None, cache_dtype=cache_dtype, seed=3), isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("window", [32, 40])  # a window of whole blocks, and one that ends mid-block
def test_sliding_window_longer_than_the_window(isa, window):
    """Sequences several windows long: released blocks are poisoned, partial blocks are masked per query."""
    check(*make_case([300, 260, 45, 120], [1, 70, 45, 3], window=window, seed=4), isa)


BF16_CASES = {  # the shapes of the tests above, over a bf16 cache: the cases the avx512bf16 variant runs on bf16 pairs
    "long prefill, window 128": (([400], [400]), dict(window=128, dim=64, seed=13)),
    "long prefill": (([400], [400]), dict(window=None, dim=64, seed=13)),
    "chunk over a prefix, 16-wide heads": (([700, 9], [40, 1]), dict(window=None, dim=16, seed=2)),
    "chunk over a prefix, 64-wide heads": (([300, 9], [40, 1]), dict(window=None, dim=64, seed=2)),
    "window of whole blocks": (([300, 260, 45, 120], [1, 70, 45, 3]), dict(window=32, seed=4)),
    "window ending mid-block": (([300, 260, 45, 120], [1, 70, 45, 3]), dict(window=40, seed=4)),
    "odd window, 64-wide heads": (([300, 90], [200, 1]), dict(window=41, dim=64, seed=14)),
    "sinks take most of the weight": (([90, 40], [30, 1]), dict(window=None, sink_shift=12.0, seed=5)),
    "8 heads a KV head": (([70, 19], [25, 1]), dict(window=None, n_kv=1, group=8, dim=16, seed=6)),
    "3 heads a KV head": (([70, 19], [25, 1]), dict(window=None, n_kv=2, group=3, dim=64, seed=6)),
    "12-wide heads (no 16-wide vectors)": (([70, 19], [25, 1]), dict(window=None, n_kv=2, group=2, dim=12, seed=6)),
    "blocks of 5 tokens": (([50, 23], [12, 1]), dict(window=20, block_size=5, seed=7)),
}


@pytest.mark.parametrize("name", BF16_CASES)
def test_bf16_pairs_over_every_shape(name):
    """The avx512bf16 variant's own code (keys and values paired, weights paired at a micro-tile's odd edges, masked
    value slots) over the windowed, chunked, GQA and odd-sized cases, with the rounding-aware reference of `check`."""
    if "avx512bf16" not in ISAS:
        pytest.skip("this CPU has no AVX512-BF16: the variant does not run here (its build is checked in test_kernel_builds)")
    (contexts, new), options = BF16_CASES[name]
    check(*make_case(contexts, new, cache_dtype=torch.bfloat16, **options), "avx512bf16")


@pytest.mark.parametrize("isa", ISAS)
def test_sinks_that_take_most_of_the_weight(isa):
    """Sinks ~ +12 over scores ~ ±1: outputs shrink by ~e^-10 and must still match (no double-counted sink)."""
    case, dense = make_case([90, 40], [30, 1], window=None, sink_shift=12.0, seed=5)
    want = reference(case, dense)
    assert want.abs().max() < 1e-2  # the sink really does take most of the weight
    check(case, dense, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n_kv,group,dim", [(1, 8, 16), (4, 1, 16), (2, 3, 64), (2, 2, 12)])
def test_gqa_shapes_and_head_dims(isa, n_kv, group, dim):
    """Groups of 1, 3 and 8 query heads per KV head, and a head size that is not a multiple of 8 (scalar tail)."""
    check(*make_case([70, 19], [25, 1], window=None, n_kv=n_kv, group=group, dim=dim, seed=6), isa)


@pytest.mark.parametrize("isa", ISAS)
def test_block_size_not_a_multiple_of_eight(isa):
    check(*make_case([50, 23], [12, 1], window=20, block_size=5, seed=7), isa)


def test_same_bits_whatever_the_thread_count():
    """Each query row belongs to one job and sums its keys in one order, so the team size (torch's setting,
    passed to the kernel) changes nothing, not even the last bit."""
    case, _ = make_case([5, 200, 33, 150], [5, 1, 20, 64], window=None, seed=9)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(paged_attention_cpu(**case))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_512_bit_registers_give_the_256_bit_bits(cache_dtype):
    """With AVX-512 the score and value products take 32 keys or dimensions a register pair; each lane is the same
    chain of FMAs in the same order as with AVX2, so the two variants agree to the last bit (64-wide heads, a
    prefill of 300 keys, a chunk over a cached prefix, and decodes)."""
    wide = [isa for isa in ISAS if isa.startswith("avx512") and not rounds_to_bf16({"k_cache": torch.empty(0, dtype=cache_dtype)}, isa)]
    if "avx2" not in ISAS or not wide:
        pytest.skip("this CPU has no AVX-512 (or no AVX2): there is no pair of variants to compare")
    case, _ = make_case([300, 150, 90], [300, 40, 1], window=None, n_kv=2, group=4, dim=64, cache_dtype=cache_dtype, seed=12)
    narrow = paged_attention_cpu(**case, isa="avx2")
    for isa in wide:
        assert torch.equal(paged_attention_cpu(**case, isa=isa), narrow), isa


def test_output_in_the_query_dtype():
    case, dense = make_case([40], [8], window=None, seed=8)
    case["q"] = case["q"].bfloat16()
    got = paged_attention_cpu(**case)
    assert got.dtype == torch.bfloat16
    case["q"] = case["q"].float()  # the same bf16-rounded queries, in fp32 for the reference
    assert (got.float() - reference(case, dense)).abs().max() < 2e-2  # bf16 output rounding


def _engine(model):
    from ossrun.engine.engine import Engine, EngineOptions

    return Engine(model, EngineOptions(kv_dtype=torch.float32, max_tokens_per_step=96, kv_cache_bytes=16 * 1024**2, max_model_len=1024))


def _generate(model, kernel) -> dict:
    """A 300-token prompt (over two 128-token windows) prefilled in 96-token chunks while a short request decodes
    beside it, 16 greedy tokens each, with `kernel` as the runner's attention (None: the reference)."""
    from ossrun.engine.request import Request, SamplingParams

    g = torch.Generator().manual_seed(11)
    prompts = {"long": torch.randint(0, 201088, (300,), generator=g).tolist(), "short": torch.randint(0, 201088, (7,), generator=g).tolist()}
    engine = _engine(model)
    engine.runner.attention_kernel = kernel
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=True)
    results = engine.generate([Request(rid, p, params) for rid, p in prompts.items()])
    assert all(len([e for e in events if e.token_id is not None]) == 16 for events in results.values())
    return results


@pytest.fixture(scope="module")
def tiny_model(checkpoints):
    from ossrun.model.checkpoint import load_checkpoint
    return load_checkpoint(checkpoints["hf"])


def test_engine_kernel_equals_reference_attention(tiny_model):
    """The exact model's MLPs with the kernel forced in: only the attention's summation order differs (~1e-6), so the
    greedy tokens are equal and the logprobs agree to 1e-4."""
    from ossrun.model.gpt_oss import GptOss

    model = GptOss.from_checkpoint(tiny_model, torch.float32, precision="exact")
    kernel, ref = _generate(model, paged_attention_cpu), _generate(model, None)
    for rid in ref:
        assert [e.token_id for e in kernel[rid]] == [e.token_id for e in ref[rid]]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(kernel[rid], ref[rid]) if a.logprob is not None) < 1e-4


def test_engine_fast_precision_uses_the_kernel_and_keeps_greedy_tokens(tiny_model):
    """On the fast precision the runner picks the kernel by itself; the greedy tokens equal the reference attention's.
    Logprobs are not compared tightly: the fast MoE and the Q8 dense layers quantise their inputs to int8, so a 1e-6
    change in attention can move an activation across a rounding step and logprobs drift by ~1e-2 over the generated
    tokens. On this random model the chosen token sits at logprob ≈ −7.8 with margins of that order, so after a few
    steps a drift can flip one: the first 8 of the 16 greedy tokens are held equal."""
    from ossrun.model.gpt_oss import GptOss

    model = GptOss.from_checkpoint(tiny_model, torch.float32, precision="fast")
    assert _engine(model).runner.attention_kernel is paged_attention_cpu
    kernel, ref = _generate(model, paged_attention_cpu), _generate(model, None)
    for rid in ref:
        assert [e.token_id for e in kernel[rid]][:8] == [e.token_id for e in ref[rid]][:8]


def test_exact_precision_keeps_the_reference_attention(tiny_model):
    from ossrun.model.gpt_oss import GptOss

    model = GptOss.from_checkpoint(tiny_model, torch.float32, precision="exact")
    assert _engine(model).runner.attention_kernel is None
