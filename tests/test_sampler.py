"""Sampler semantics, each against a hand computation on a tiny vocabulary.

The draw is an exponential race whose Exp(1) draws come from the request's own generator, so for a
seeded request we know them (`draws`) and can predict its token from hand-computed final
probabilities p: argmax p_i / E_i (`race`). Checking that prediction over many seeds turns "these
are the final probabilities" into exact, deterministic assertions: a wrong support or a wrong
weight changes the winner for some seed.
"""

from __future__ import annotations

import math

import pytest
import torch

from ossrun.engine.request import SamplingParams, TokenLogprob
from ossrun.engine.sampler import ConstraintError, Sampler, SamplingState

LN2 = math.log(2)
NEG = -1000.0  # exp(NEG - max) is exactly 0 in float32: a token with no probability


def state(prompt=(), outputs=(), **params) -> SamplingState:
    s = SamplingState(SamplingParams(**params), list(prompt))
    for token in outputs:
        s.append(token)
    return s


def sample(rows, states, masks=None, sampler=None):
    logits = torch.tensor(rows, dtype=torch.float32)
    return (sampler or Sampler(0))(logits, states, masks)


def draws(seed: int, vocab: int, steps: int = 1) -> list[torch.Tensor]:
    """The Exp(1) draws a request with this seed makes, per step: one per 1024-token block, then
    one per token of a block (the sampler's layout)."""
    g = torch.Generator().manual_seed(seed)
    block = min(1024, vocab)
    width = -(-vocab // block) + block
    return [torch.empty(width, dtype=torch.float64).exponential_(generator=g) for _ in range(steps)]


def race(probs, noise: torch.Tensor) -> int:
    """The winner of the two-level race: the block with the largest mass / E_block, then in it the
    token with the largest p_i / E_(blocks + i mod 1024). One block (V ≤ 1024): argmax p_i / E_(1+i)."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    block = min(1024, probs.numel())
    blocks = -(-probs.numel() // block)
    masses = torch.stack([probs[b * block:(b + 1) * block].sum() for b in range(blocks)])
    winner = int((masses / noise[:blocks]).argmax())
    local = probs[winner * block:(winner + 1) * block]
    return winner * block + int((local / noise[blocks:blocks + local.numel()]).argmax())


def softmax(xs: list[float]) -> list[float]:
    peak = max(xs)
    e = [math.exp(x - peak) for x in xs]
    return [v / sum(e) for v in e]


def log_softmax(xs: list[float]) -> list[float]:
    peak = max(xs)
    lse = peak + math.log(sum(math.exp(x - peak) for x in xs))
    return [x - lse for x in xs]


def assert_final_probs(logits: list[float], expected: list[float], masks=None, seeds: int = 150, **params) -> None:
    """For every seed, the sampled token is the race winner under the hand-computed `expected`."""
    assert math.isclose(sum(expected), 1.0)
    winners = set()
    for seed in range(seeds):
        winner = race(expected, draws(seed, len(logits))[0])
        assert sample([logits], [state(seed=seed, **params)], masks).token_ids == [winner], seed
        winners.add(winner)
    assert winners >= {i for i, p in enumerate(expected) if p > 0.05}  # the seeds covered the support


# -- greedy ---------------------------------------------------------------------------------


def test_greedy_picks_argmax_and_breaks_ties_by_lowest_id():
    out = sample([[1, 3, 3, 0, 3, -1], [0, 0, 0, 0, 0, 5]], [state(temperature=0), state(temperature=0)])
    assert out.token_ids == [1, 5]
    assert out.logprobs == [None, None] and out.top_logprobs == [(), ()]


def test_greedy_rows_draw_no_random_numbers():
    logits = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    alone, mixed = Sampler(5), Sampler(5)
    seeded_greedy = state(temperature=0, seed=9)
    before = seeded_greedy.generator.get_state()
    for _ in range(20):
        a = alone(torch.tensor([logits]), [state()]).token_ids
        m = mixed(torch.tensor([logits, logits, logits]), [state(temperature=0), state(), seeded_greedy]).token_ids
        assert m == [5, a[0], 5]
    assert torch.equal(seeded_greedy.generator.get_state(), before)


# -- penalties ------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_multiplies_negative_on_prompt_and_output():
    logits = [3.0, 1.0, 0.5, -1.0, -2.0, 0.25]
    # prompt has 0 (positive) and 3 (negative, prompt only); the output has 4 (negative).
    s = state(prompt=[0, 3, 0], outputs=[4], repetition_penalty=2.0, temperature=0, logprobs=True, top_logprobs=6)
    out = sample([logits], [s])
    processed = [1.5, 1.0, 0.5, -2.0, -4.0, 0.25]
    assert out.token_ids == [0]
    expected = log_softmax(processed)
    assert out.logprobs[0] == pytest.approx(expected[0], abs=1e-6)
    assert [t.token_id for t in out.top_logprobs[0]] == [0, 1, 2, 5, 3, 4]
    assert [t.logprob for t in out.top_logprobs[0]] == pytest.approx(sorted(expected, reverse=True), abs=1e-6)
    # A stronger penalty moves the argmax: 3 / 4 = 0.75 < 1.
    assert sample([logits], [state(prompt=[0], repetition_penalty=4.0, temperature=0)]).token_ids == [1]


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_tiny_repetition_penalty_keeps_logits_and_logprobs_finite(temperature):
    """Before: a penalty just above 0 (Workers AI's range allows 7e-39) divided a positive logit past float32's
    largest value: +inf logits, a NaN logprob, and a 500 when the answer was written as JSON (schemathesis found it).
    The penalised tokens now stay the most likely, at the largest finite logit."""
    s = state(prompt=[0, 1], repetition_penalty=7e-39, temperature=temperature, seed=3, logprobs=True, top_logprobs=4)
    out = sample([[3.0, 2.5, 0.5, -1.0]], [s])
    assert out.token_ids[0] in (0, 1)
    values = [out.logprobs[0]] + [t.logprob for t in out.top_logprobs[0]]
    assert all(math.isfinite(v) for v in values), values
    assert all(v <= 0 for v in values)


def test_frequency_and_presence_penalties_count_only_output_tokens():
    s = state(prompt=[1, 1, 1], outputs=[2, 2, 3], frequency_penalty=0.5, presence_penalty=0.25, temperature=0, logprobs=True, top_logprobs=6)
    out = sample([[0.0] * 6], [s])
    # token 1 (prompt only) untouched; token 2: -(2 * 0.5 + 0.25); token 3: -(1 * 0.5 + 0.25).
    expected = log_softmax([0.0, 0.0, -1.25, -0.75, 0.0, 0.0])
    assert out.token_ids == [0]
    got = {t.token_id: t.logprob for t in out.top_logprobs[0]}
    assert got == pytest.approx(dict(enumerate(expected)), abs=1e-6)


def test_negative_penalties_raise_output_tokens():
    s = state(outputs=[4, 4], frequency_penalty=-1.0, presence_penalty=-0.5, temperature=0)
    assert sample([[2.0, 0, 0, 0, 0, 0]], [s]).token_ids == [4]  # 0 + 2 + 0.5 > 2


def test_repetition_penalty_applies_before_frequency_penalty():
    s = state(outputs=[0], repetition_penalty=2.0, frequency_penalty=1.0, temperature=0, logprobs=True)
    out = sample([[2.0, 0.25, 0, 0, 0, 0]], [s])
    # 2 / 2 - 1 = 0 (the other order would give (2 - 1) / 2 = 0.5 > 0.25).
    assert out.token_ids == [1]
    assert out.logprobs[0] == pytest.approx(log_softmax([0.0, 0.25, 0, 0, 0, 0])[1], abs=1e-6)


def test_tokens_from_penalty_exempt_from_are_never_penalised():
    """A chat format's special tokens (ids 4 and 5 here) fill every prompt; penalising them broke harmony's framing
    (the model stopped writing `<|end|>`, an empty answer at repetition_penalty 2.0). None of the three touches them."""
    params = dict(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5, temperature=0, logprobs=True, top_logprobs=6)
    s = state(prompt=[0, 4, 5, 4], outputs=[1, 4, 5, 5], penalty_exempt_from=4, **params)
    assert sorted(s.seen_ids().tolist()) == [0, 1]
    assert s.output_counts()[0].tolist() == [1]
    out = sample([[2.0, 2.0, 1.0, 0.0, 2.0, 2.0]], [s])
    # 0: 2 / 2 (prompt); 1: 2 / 2 - 1 - 0.5 (output); 4 and 5 as they were, though seen in both.
    expected = log_softmax([1.0, -0.5, 1.0, 0.0, 2.0, 2.0])
    assert {t.token_id: t.logprob for t in out.top_logprobs[0]} == pytest.approx(dict(enumerate(expected)), abs=1e-6)
    with pytest.raises(ValueError, match="penalty_exempt_from"):
        SamplingParams(penalty_exempt_from=-1)


def test_penalty_state_is_incremental_and_copies_the_prompt():
    prompt = [5, 1, 5]
    s = SamplingState(SamplingParams(repetition_penalty=1.5, frequency_penalty=0.1), prompt)
    prompt.append(2)  # the engine's token list grows with the output; the state must not follow it
    for token in [3, 1, 3, 3]:
        s.append(token)
    assert sorted(s.seen_ids().tolist()) == [1, 3, 5]
    ids, counts = s.output_counts()
    assert dict(zip(ids.tolist(), counts.tolist())) == {3: 3.0, 1: 1.0}
    plain = state(prompt=[1, 2])
    assert plain.seen_ids() is None and plain.output_counts() is None


# -- temperature, top_k, top_p ------------------------------------------------------------------


def test_temperature_divides_logits():
    logits = [0.0, math.log(3), 1.0, -1.0, 0.5, 2.0]
    assert_final_probs(logits, softmax([x / 2 for x in logits]), temperature=2.0)
    assert_final_probs(logits, softmax([x / 0.5 for x in logits]), temperature=0.5)


def test_top_k_keeps_the_k_largest():
    logits = [1.0, 3.0, 2.0, 0.0, -1.0, 2.5]
    kept = softmax([3.0, 2.0, 2.5])
    assert_final_probs(logits, [0, kept[0], kept[1], 0, 0, kept[2]], top_k=3)
    assert_final_probs(logits, [0, 1, 0, 0, 0, 0], top_k=1)
    assert_final_probs(logits, softmax(logits), top_k=6)  # top_k >= V is off


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = [1.0, 3.0, 2.0, 2.0, 0.0, -1.0]
    kept = softmax([3.0, 2.0, 2.0])
    assert_final_probs(logits, [0, kept[0], kept[1], kept[2], 0, 0], top_k=2)


def test_top_k_then_temperature_then_top_p():
    logits = [1.0, 3.0, 2.0, 0.0, -1.0, 2.5]
    # top_k=3 → {1, 5, 2}; T=0.5 → softmax([6, 5, 4]) = [.665, .245, .090]; top_p=0.8 → {1, 5}.
    p = softmax([6.0, 5.0])
    assert_final_probs(logits, [0, p[0], 0, 0, 0, p[1]], top_k=3, temperature=0.5, top_p=0.8)


@pytest.mark.parametrize("top_k", [0, 3])  # long path, and the top_k path
@pytest.mark.parametrize("top_p", [1.0, 0.7287])
def test_a_temperature_below_float32_range_samples_the_top_tokens(top_k, top_p):
    # Found by the bounded fuzz: temperature 9e-196 is 0.0 in float32, so dividing by it made 0/0 = NaN
    # and the whole engine step failed (500). Any positive temperature must sample (here: the max).
    logits = [1.0, 3.0, 2.0, 0.0, -1.0, 2.5]
    for temperature in (9.019024795135673e-196, 1e-45, 1e-30):
        for seed in range(5):
            params = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
            assert sample([logits], [state(**params)]).token_ids == [1], (temperature, seed)


# Exact probabilities: softmax of these is [1/8, 1/2, 1/16, 1/4, 1/16, 0] in float32, bit for bit.
DYADIC = [-2 * LN2, 0.0, -3 * LN2, -LN2, -3 * LN2, NEG]


@pytest.mark.parametrize("top_k", [0, 5])  # long path, and the top_k path (5th logit ≠ 6th)
def test_top_p_stops_at_exact_cumulative_equality(top_k):
    assert torch.softmax(torch.tensor(DYADIC), -1).tolist() == [0.125, 0.5, 0.0625, 0.25, 0.0625, 0.0]
    # 1/2 + 1/4 = 0.75 exactly: the nucleus is {1, 3}; any more needs token 0 as well.
    assert_final_probs(DYADIC, [0, 2 / 3, 0, 1 / 3, 0, 0], top_p=0.75, top_k=top_k)
    assert_final_probs(DYADIC, [1 / 7, 4 / 7, 0, 2 / 7, 0, 0], top_p=0.7500001, top_k=top_k)
    # 0.875 exactly, then the two tied 1/16 tokens: 0.9 needs one of them, the lower id.
    assert_final_probs(DYADIC, [2 / 15, 8 / 15, 1 / 15, 4 / 15, 0, 0], top_p=0.9, top_k=top_k)


@pytest.mark.parametrize("top_k", [0, 5])  # long path, and the top_k path
def test_min_p_keeps_tokens_at_least_min_p_times_the_top_one(top_k):
    """Before: min_p was accepted and ignored. Relative to the top token (1/2): 1/4 is its half, 1/8 its quarter."""
    assert_final_probs(DYADIC, [0, 2 / 3, 0, 1 / 3, 0, 0], min_p=0.5, top_k=top_k)  # 1/4 ≥ 0.5 × 1/2: kept exactly
    assert_final_probs(DYADIC, [0, 1, 0, 0, 0, 0], min_p=0.51, top_k=top_k)
    assert_final_probs(DYADIC, [1 / 7, 4 / 7, 0, 2 / 7, 0, 0], min_p=0.25, top_k=top_k)
    assert_final_probs(DYADIC, [0, 1, 0, 0, 0, 0], min_p=1.0, top_k=top_k)  # the top token always stays


def test_min_p_is_taken_after_temperature_and_before_top_p():
    # T=0.5 squares the probabilities: p ∝ [1/64, 1/4, 1/256, 1/16, 1/256, 0], so token 3 is 1/4 of the top and token 0
    # 1/16: min_p 0.2 keeps {1, 3} → [0.8, 0.2] (at T=1 it would keep token 0 too), then top_p 0.75 keeps {1}.
    assert_final_probs(DYADIC, [0, 0.8, 0, 0.2, 0, 0], min_p=0.2, temperature=0.5)
    assert_final_probs(DYADIC, [0, 1, 0, 0, 0, 0], min_p=0.2, temperature=0.5, top_p=0.75)


@pytest.mark.parametrize("top_k", [0, 5])
def test_tiny_top_p_keeps_only_the_top_token(top_k):
    for seed in range(20):
        assert sample([DYADIC], [state(top_p=1e-9, top_k=top_k, seed=seed)]).token_ids == [1]


@pytest.mark.parametrize("top_k", [0, 5])
def test_top_p_zero_is_the_smallest_nucleus(top_k):
    """OpenAI's range takes top_p 0 (SamplingParams refused it): the most likely token alone, at any temperature, as
    greedy picks it (ties → the lowest id), also when more tokens tie at the top than the nucleus' first candidates."""
    flat = [NEG] * 2000
    flat[700:1000] = [0.0] * 300  # 300 tokens tied at the top, more than the 128 candidates looked at first
    for seed in range(20):
        assert sample([DYADIC], [state(top_p=0.0, top_k=top_k, temperature=2.0, seed=seed)]).token_ids == [1]
        assert sample([[0.0, 3.0, 3.0, 1.0]], [state(top_p=0.0, top_k=top_k, seed=seed)]).token_ids == [1]
        assert sample([flat], [state(top_p=0.0, top_k=top_k, temperature=2.0, seed=seed)]).token_ids == [700]
    assert sample([DYADIC, DYADIC], [state(top_p=0.0), state(temperature=0.0)]).token_ids == [1, 1]


@pytest.mark.parametrize("top_k", [0, 4])
def test_top_p_ties_keep_the_lowest_ids(top_k):
    logits = [0.0, 0.0, 0.0, 0.0, NEG, NEG]  # four tokens of exactly 1/4
    assert_final_probs(logits, [0.5, 0.5, 0, 0, 0, 0], top_p=0.5, top_k=top_k)
    assert_final_probs(logits, [1 / 3, 1 / 3, 1 / 3, 0, 0, 0], top_p=0.6, top_k=top_k)


def test_top_p_is_exact_for_a_nucleus_larger_than_the_first_candidates():
    # 300 tokens of e = 1 at ids 1000..1299, 1700 of e = 1/2 elsewhere: mass 1150, top_p 0.5 → 575 =
    # the 300 large ones + 550 small ones, the lowest ids (0..549), by the tie rule.
    logits = [-LN2] * 2000
    logits[1000:1300] = [0.0] * 300
    expected = [0.5 / 575 if i < 550 else 0.0 for i in range(2000)]
    expected[1000:1300] = [1 / 575] * 300
    for seed in range(40):
        winner = race(expected, draws(seed, 2000)[0])
        assert sample([logits], [state(seed=seed, top_p=0.5)]).token_ids == [winner]


def test_top_p_one_keeps_everything():
    assert_final_probs(DYADIC, [0.125, 0.5, 0.0625, 0.25, 0.0625, 0.0], top_p=1.0)


def test_removed_tokens_are_never_drawn():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0, 2.5]]).repeat(3000, 1)
    for params, allowed in [({"top_k": 2}, {1, 5}), ({"top_p": 0.5}, {1, 5}), ({"top_k": 3, "top_p": 0.7}, {1, 5})]:
        tokens = Sampler(1)(logits.clone(), [state(**params) for _ in range(3000)]).token_ids
        assert set(tokens) == allowed


# -- logprobs -------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_before_temperature_and_top_k():
    logits = [1.0, 2.0, 3.0, 0.0, -1.0, 0.5]
    expected = log_softmax(logits)
    greedy = sample([logits], [state(temperature=0, logprobs=True, top_logprobs=3)])
    assert greedy.token_ids == [2]
    assert greedy.logprobs[0] == pytest.approx(expected[2], abs=1e-6)
    assert [t.token_id for t in greedy.top_logprobs[0]] == [2, 1, 0]
    assert [t.logprob for t in greedy.top_logprobs[0]] == pytest.approx([expected[2], expected[1], expected[0]], abs=1e-6)
    assert isinstance(greedy.top_logprobs[0][0], TokenLogprob)
    for seed in range(10):
        out = sample([logits], [state(temperature=0.5, top_k=2, top_p=0.9, seed=seed, logprobs=True, top_logprobs=2)])
        token = out.token_ids[0]
        assert token in (1, 2)
        assert out.logprobs[0] == pytest.approx(expected[token], abs=1e-6)
        assert [(t.token_id, round(t.logprob, 5)) for t in out.top_logprobs[0]] == [(2, round(expected[2], 5)), (1, round(expected[1], 5))]


def test_logprobs_only_for_rows_that_ask():
    logits = [[1.0, 2.0, 3.0, 0.0, -1.0, 0.5]] * 3
    out = sample(logits, [state(temperature=0), state(temperature=0, logprobs=True), state(logprobs=True, top_logprobs=1, seed=3)])
    assert out.logprobs[0] is None and out.top_logprobs[0] == ()
    assert out.logprobs[1] == pytest.approx(log_softmax(logits[0])[2], abs=1e-6) and out.top_logprobs[1] == ()
    assert out.logprobs[2] == pytest.approx(log_softmax(logits[0])[out.token_ids[2]], abs=1e-6)
    assert [t.token_id for t in out.top_logprobs[2]] == [2]


# -- masks ----------------------------------------------------------------------------------


def test_mask_forbids_tokens_before_everything_else():
    logits = [1.0, 3.0, 2.0, 0.0, -1.0, 2.5]
    allowed = torch.tensor([True, False, True, True, False, False])
    masks = [allowed, None]
    out = sample([logits, logits], [state(temperature=0, logprobs=True, top_logprobs=5), state(temperature=0)], masks)
    assert out.token_ids == [2, 1]  # the second row has no mask
    expected = log_softmax([1.0, 2.0, 0.0])  # over the allowed tokens 0, 2, 3 only
    assert out.logprobs[0] == pytest.approx(expected[1], abs=1e-6)
    assert [(t.token_id, round(t.logprob, 5)) for t in out.top_logprobs[0]] == [
        (2, round(expected[1], 5)), (0, round(expected[0], 5)), (3, round(expected[2], 5))
    ]  # forbidden tokens are not alternatives
    p = softmax([1.0, 2.0, 0.0])
    assert_final_probs(logits, [p[0], 0, p[1], p[2], 0, 0], masks=[allowed])
    many = Sampler(2)(torch.tensor([logits] * 2000), [state(top_k=2) for _ in range(2000)], [allowed] * 2000).token_ids
    assert set(many) == {0, 2}  # top_k applies after the mask


# -- logit_bias -----------------------------------------------------------------------------


def test_logit_bias_bans_and_forces_greedy_tokens_in_a_batch():
    logits = [1.0, 3.0, 2.0, 0.0, -1.0, 2.5]
    rows = [logits] * 4
    states = [state(temperature=0), state(temperature=0, logit_bias=((1, -100.0),)),
              state(temperature=0, logit_bias=((4, 100.0), (1, -100.0))), state(temperature=0, logit_bias=((5, 0.75),))]
    # unbiased: 1; 1 banned: the next best, 5; 4 forced; 5 + 0.75 = 3.25 > 3.
    assert sample(rows, states).token_ids == [1, 5, 4, 5]


def test_logit_bias_applies_before_penalties_temperature_and_top_k():
    s = state(prompt=[0], logit_bias=((0, 2.0), (3, -1.0)), repetition_penalty=2.0, temperature=0, logprobs=True, top_logprobs=6)
    out = sample([[2.0, 2.5, 0.0, 0.0, 0.0, 0.0]], [s])
    processed = [(2.0 + 2.0) / 2, 2.5, 0.0, -1.0, 0.0, 0.0]  # the bias first, then the repetition penalty
    assert out.token_ids == [1]
    got = {t.token_id: t.logprob for t in out.top_logprobs[0]}
    assert got == pytest.approx(dict(enumerate(log_softmax(processed))), abs=1e-6)
    # Sampled rows draw from the biased distribution; top_k ranks the biased logits.
    logits = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    biased = [0.0, 1.0, 0.0, 0.0 + LN2, 0.0, -100.0]
    assert_final_probs(logits, softmax([b / 2 for b in biased]), temperature=2.0, logit_bias=((3, LN2), (5, -100.0)))
    many = Sampler(3)(torch.tensor([logits] * 500), [state(top_k=1, logit_bias=((2, 5.0),)) for _ in range(500)]).token_ids
    assert set(many) == {2}


def test_logit_bias_never_overrides_the_grammar_mask():
    logits = [1.0, 3.0, 2.0, 0.0, -1.0, 2.5]
    allowed = torch.tensor([True, False, True, True, False, False])
    forced = torch.tensor([False, False, False, True, False, False])
    states = [state(temperature=0, logit_bias=((4, 100.0),)), state(logit_bias=((4, 100.0), (1, 100.0))),
              state(temperature=0, logit_bias=((3, -100.0),))]
    out = sample([logits] * 3, states, [allowed, allowed, forced])
    assert out.token_ids[0] == 2 and out.token_ids[1] in (0, 2, 3)  # +100 on a masked token brings nothing back
    assert out.token_ids[2] == 3  # -100 cannot take away the only token the grammar allows


def test_logit_bias_is_checked_and_built_once():
    for bad in (((-1, 1.0),), ((2, 100.5),), ((2, float("nan")),), ((2, 1.0), (2, 2.0))):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
    s = state(logit_bias=((7, -2.5), (3, 1.0)))
    assert s.bias[0].tolist() == [7, 3] and s.bias[1].tolist() == [-2.5, 1.0]
    assert state().bias is None


def test_mask_allowing_nothing_raises():
    masks = [torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)]
    with pytest.raises(ValueError, match="constraint allows no token") as caught:
        sample([[0.0] * 6] * 2, [state(), state()], masks)
    assert isinstance(caught.value, ConstraintError) and caught.value.row == 1


# -- seeds and the distribution -------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.9, "top_p": 0.8, "repetition_penalty": 1.3, "frequency_penalty": 0.4},
        {"temperature": 1.2, "top_k": 5, "presence_penalty": 0.5, "logprobs": True, "top_logprobs": 3},
        {},
    ],
)
def test_seeded_request_is_independent_of_its_batch(params):
    vocab, steps = 50, 40
    g = torch.Generator().manual_seed(0)
    step_logits = [torch.randn(6, vocab, generator=g) * 2 for _ in range(steps)]

    def run(batch: bool) -> list[int]:
        target = SamplingState(SamplingParams(seed=1234, **params), [1, 2, 3])
        others = [
            SamplingState(SamplingParams(seed=7, top_k=20), [4]),
            SamplingState(SamplingParams(), [5]),
            SamplingState(SamplingParams(temperature=0, logprobs=True), [6]),
            SamplingState(SamplingParams(top_p=0.5, repetition_penalty=1.1), [7]),
            SamplingState(SamplingParams(seed=99, top_k=3, top_p=0.9), [8]),
        ]
        sampler, tokens = Sampler(int(batch)), []
        for logits in step_logits:
            if batch:
                states = others[:3] + [target] + others[3:]
                out = sampler(logits.clone(), states)
                for s, t in zip(states, out.token_ids):
                    s.append(t)
                tokens.append(out.token_ids[3])
            else:
                out = sampler(logits[3:4].clone(), [target])
                target.append(out.token_ids[0])
                tokens.append(out.token_ids[0])
        return tokens

    alone = run(batch=False)
    assert run(batch=True) == alone
    assert len(set(alone)) > 3  # it really sampled


def test_seeded_draws_follow_the_generator_step_by_step():
    logits = [0.0, 0.0, 0.0, 0.0, NEG, NEG]  # four tokens of exactly 1/4
    s, sampler = state(seed=42), Sampler(0)
    tokens = [sampler(torch.tensor([logits]), [s]).token_ids[0] for _ in range(30)]
    assert tokens == [race([0.25] * 4 + [0, 0], noise) for noise in draws(42, 6, steps=30)]
    assert len(set(tokens)) == 4


def test_seeded_draw_survives_noise_that_swaps_the_tokens_at_the_top_p_cut():
    """A batched forward moves logits by ~1e-6, which can swap the two tokens at the edge of a flat
    distribution's nucleus. The draw must not move: an inverse CDF in token-id order would shift
    every boundary between the two swapped ids by a token's width, so nearly every seed would pick
    a neighbouring token; in the race only the two blocks' masses move, by about 1/1024."""
    vocab, top_p = 50000, 0.9
    values = torch.randn(vocab, generator=torch.Generator().manual_seed(5)) * 0.1
    ranked = values.sort(descending=True).values
    kept = int((torch.softmax(ranked.double(), 0).cumsum(0) < top_p).sum()) + 1
    last_in, first_out = ranked[kept - 1], ranked[kept]
    assert 0 < last_in - first_out < 1e-4
    rest = ranked[torch.arange(vocab) != kept - 1]
    rest = rest[rest != first_out][: vocab - 2]
    before = torch.cat([last_in[None], rest, first_out[None]])[None]  # in at id 0, out at id V-1
    after = torch.cat([first_out[None], rest, last_in[None]])[None]  # the two swapped
    for seed in range(20):
        a = Sampler(0)(before.clone(), [state(seed=seed, top_p=top_p)]).token_ids
        assert Sampler(1)(after.clone(), [state(seed=seed, top_p=top_p)]).token_ids == a


def test_distribution_matches_probabilities():
    probs = [0.5, 0.3, 0.2]
    logits = torch.tensor([[math.log(p) for p in probs]])
    s, sampler = state(seed=2024), Sampler(0)
    counts = [0, 0, 0]
    for _ in range(4000):
        counts[sampler(logits.clone(), [s]).token_ids[0]] += 1
    assert [c / 4000 for c in counts] == pytest.approx(probs, abs=0.025)
    batch = Sampler(11)(logits.repeat(4000, 1), [state() for _ in range(4000)]).token_ids
    assert [batch.count(t) / 4000 for t in range(3)] == pytest.approx(probs, abs=0.025)


def test_large_vocabulary_matches_a_float64_reference():
    """Several race blocks (the last one short), and top_p nuclei larger than the first candidates."""
    vocab = 5000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3)) * 0.5
    for params in [{"top_p": 0.9, "temperature": 0.8}, {}, {"top_k": 700, "top_p": 0.7}]:
        probs = _reference_probs(logits[0].double(), **params)
        assert int((probs > 0).sum()) > 128
        winners = set()
        for seed in range(25):
            winner = race(probs, draws(seed, vocab)[0])
            assert Sampler(0)(logits.clone(), [state(seed=seed, **params)]).token_ids == [winner], (params, seed)
            winners.add(winner // 1024)
        assert len(winners) > 1


def _reference_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    x = logits / temperature
    if top_k:
        x[x < x.topk(top_k).values[-1]] = float("-inf")
    probs = torch.softmax(x, 0)
    if top_p < 1:
        ranked, order = torch.sort(probs, descending=True, stable=True)
        above = ranked.cumsum(0) - ranked  # mass ranked strictly higher
        probs[order[above >= top_p]] = 0
    return probs


@pytest.mark.parametrize("field, value", [("temperature", math.inf), ("temperature", float("1e309")), ("temperature", math.nan),
                                          ("top_p", math.inf), ("top_p", math.nan), ("repetition_penalty", math.inf)])
def test_non_finite_sampling_values_are_refused(field, value):
    """`temperature >= 0` let inf through: every logit divided to 0, a uniformly random answer from `ossrun generate`."""
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
