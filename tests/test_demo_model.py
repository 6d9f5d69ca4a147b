"""The demo model: MXFP4 quantisation, an exact export, reproducible training, and the shipped weights'
answers through the real `GptOss` (the checkpoint the server loads), at both precisions."""

from __future__ import annotations

import random

import pytest
import torch

from ossrun import harmony
from ossrun.demo_model import evaluate, world
from ossrun.demo_model.conversations import arithmetic_steps, generate
from ossrun.demo_model.export import export
from ossrun.demo_model.train import DEMO_CONFIG, TrainSettings, batches, train
from ossrun.demo_model.trainable import TrainableGptOss
from ossrun.demo_model.vocab import Vocab
from ossrun.model import mxfp4
from ossrun.model.attention import DenseAttention
from ossrun.model.demo_weights import TOKEN_IDS, demo_dir, expand, read_compact
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.config import HARMONY_VOCAB_SIZE
from ossrun.model.gpt_oss import GptOss
from ossrun.model.resolve import resolve_model
from ossrun.paths import cache_dir


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster than two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- MXFP4 ----------------------------------------------------------------------------------------------

def test_quantize_packs_what_round_to_mxfp4_computes():
    w = torch.randn(3, 8, 96, generator=torch.Generator().manual_seed(0)) * torch.tensor([1e-3, 1.0, 40.0]).view(3, 1, 1)
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (3, 8, 3, 16) and scales.shape == (3, 8, 3)
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.float32), mxfp4.round_to_mxfp4(w))
    # Within half a step of FP4's coarsest spacing (2 at the top of the range) times the block's scale.
    scale = torch.exp2(scales.float() - mxfp4.SCALE_BIAS).repeat_interleave(32, dim=-1)
    assert ((mxfp4.round_to_mxfp4(w) - w).abs() <= scale + 1e-12).all()


def test_quantize_is_lossless_on_representable_values():
    """Blocks whose largest value is 6·2^e (FP4's top code) get scale 2^e, and every code survives."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (4, 2, 32), generator=g)
    codes[..., 0] = 7  # 6.0: the block maximum
    powers = 2.0 ** torch.randint(-4, 4, (4, 2, 1), generator=g)
    values = (torch.tensor(mxfp4.FP4_VALUES)[codes] * powers).reshape(4, 64)
    blocks, scales = mxfp4.quantize(values)
    assert torch.equal(scales.float() - mxfp4.SCALE_BIAS, torch.log2(powers.squeeze(-1)))
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.float32), values)


# -- the training data ----------------------------------------------------------------------------------

def test_arithmetic_steps_end_at_the_answer():
    """Every step moves one unit and the last pair gives the result, for every problem of the world."""
    for op, compute in world.OPERATIONS.items():
        for a in range(world.ARITHMETIC_MAX + 1):
            for b in range(world.ARITHMETIC_MAX + 1):
                pairs = [tuple(int(n) for n in step.split(op)) for step in arithmetic_steps(a, op, b).split("=")]
                assert pairs[0] == (a, b) and 0 in pairs[-1] and all(0 not in pair for pair in pairs[:-1] if op == "-")
                assert all(compute(*pair) == compute(a, b) for pair in pairs)
                assert len(pairs) == (b if op == "+" else min(a, b)) + 1


# -- export -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_data():
    samples = generate(40, seed=3)
    return samples, Vocab.from_samples(samples)


def test_export_is_exact_through_the_real_model(small_data, tmp_path):
    """The exported checkpoint computes what the trainable model computes: same logits on the known
    tokens, exactly 0 on every other token of the 201088."""
    samples, vocab = small_data
    model = TrainableGptOss(DEMO_CONFIG, len(vocab), seed=5)
    with torch.no_grad():
        for p in model.parameters():  # make biases, sinks and norms matter
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    compact = export(model, vocab, tmp_path / "demo.safetensors", {})
    real = GptOss.from_checkpoint(load_checkpoint(expand(compact, tmp_path / "full")), torch.float32)
    prompt = samples[0].prompt + samples[0].completion
    with torch.no_grad():
        expected = model(torch.tensor([vocab.compact(prompt)]))[0, :, 1:]  # drop UNK
    tokens, positions = torch.tensor(prompt), torch.arange(len(prompt))
    logits = real(tokens, positions, DenseAttention(torch.zeros_like(tokens), positions))
    assert logits.shape == (len(prompt), HARMONY_VOCAB_SIZE)
    known = vocab.ids_tensor()
    torch.testing.assert_close(logits[:, known], expected, atol=2e-4, rtol=2e-4)
    unused = torch.ones(HARMONY_VOCAB_SIZE, dtype=torch.bool)
    unused[known] = False
    assert torch.count_nonzero(logits[:, unused]) == 0


def test_unknown_tokens_read_as_the_unknown_embedding(small_data, tmp_path):
    samples, vocab = small_data
    model = TrainableGptOss(DEMO_CONFIG, len(vocab), seed=6)
    full = load_checkpoint(expand(export(model, vocab, tmp_path / "d.safetensors", {}), tmp_path / "full"))
    embedding = full.tensors["embedding.weight"]
    unknown = next(t for t in range(1000, 2000) if t not in set(vocab.token_ids))
    assert torch.equal(embedding[unknown], model.embedding.detach()[0].bfloat16())
    assert torch.equal(embedding[vocab.token_ids[3]], model.embedding.detach()[4].bfloat16())


# -- training -------------------------------------------------------------------------------------------

def test_training_is_seeded_and_learns(small_data):
    samples, _ = small_data
    settings = TrainSettings(seed=7, steps=8, batch_size=2, lr=3e-3, warmup=2)
    first, second = train(DEMO_CONFIG, settings, samples), train(DEMO_CONFIG, settings, samples)
    assert first.losses == second.losses
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert sum(first.losses[-2:]) < sum(first.losses[:2]) - 1.0


def test_batches_learn_only_the_completion(small_data):
    samples, vocab = small_data
    ids, targets = next(batches(samples[:1], vocab, 1, random.Random(0)))
    learnt = targets[0][targets[0] != -100].tolist()
    assert learnt == vocab.compact(samples[0].completion)


# -- the shipped weights --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    path = resolve_model(None)  # the default model is the demo
    assert path == demo_dir(cache_dir())
    return path


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_shipped_model_knows_ten_capitals(shipped, precision):
    dtype = torch.float32 if precision == "exact" else torch.bfloat16
    model = evaluate.load(shipped, dtype, precision)
    for body, city in evaluate.capital_prompts(10):
        parsed = evaluate.answer(model, body)
        assert parsed.reasoning and city in parsed.content, (body, parsed)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_shipped_model_adds_and_subtracts(shipped, precision):
    """At the served precisions too: `make demo` runs the fast one (bf16, int8 kernels)."""
    dtype = torch.float32 if precision == "exact" else torch.bfloat16
    model = evaluate.load(shipped, dtype, precision)
    for a, op, b, spaced in [(7, "+", 5, " "), (18, "+", 17, " "), (4, "-", 11, " "), (16, "-", 9, " "),
                             (2, "+", 3, ""), (12, "-", 5, ""), (9, "+", 14, "")]:  # "2+3": other tokens (hunt round 13 C-F11)
        parsed = evaluate.answer(model, {"messages": [{"role": "user", "content": f"What is {a}{spaced}{op}{spaced}{b}?"}]})
        assert parsed.content == f"{a} {op} {b} = {world.OPERATIONS[op](a, b)}.", (a, op, b, parsed)


def test_shipped_model_never_picks_an_unused_token(shipped):
    _, tensors, _ = read_compact()
    known = set(tensors[TOKEN_IDS].tolist())
    model = evaluate.load(shipped)
    for body in evaluate.report_bodies():
        completion = evaluate.greedy(model, harmony.render_request(body).token_ids)
        assert set(completion) <= known, harmony.decode(completion)
