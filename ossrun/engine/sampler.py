"""The sampler: one row of logits per sequence in, one token (and its logprobs) per sequence out.

Pipeline, per row, in this order (vLLM v1 `Sampler.forward` order; HF `generate` agrees):

1. Structured-output mask: forbidden tokens get -inf before anything else, so no later stage can
   bring them back. A mask that allows nothing raises `ConstraintError` (a `ValueError`). A mask is a
   bool row of the allowed tokens, or the ids of the forbidden ones when they are few.
2. Logit bias (OpenAI `logit_bias`): each biased token's logit += its bias (in [-100, 100]), before the
   penalties, temperature, top_k and top_p, and for greedy rows too. After the mask, so the grammar wins:
   a masked token stays -inf whatever its bias, and a -100 bias cannot take away a token the grammar
   forces. Additive, as OpenAI defines it and vLLM applies it: ±100 bans or forces a token in practice
   (an LLM's logits span far less than 100), without a special case that could leave a row with nothing.
3. Repetition penalty (CTRL, Keskar et al. 2019; vLLM and HF `repetition_penalty`): every token seen
   in the prompt OR the output so far: logit > 0 → logit / p, else logit * p. Applied once per
   distinct token, however often it occurred. Tokens at or above `penalty_exempt_from` (a chat format's special
   tokens: the caller says which) are never penalised, here or in 4: a harmony prompt is full of `<|end|>`,
   `<|start|>`, `<|message|>`, and penalising them broke the message framing (an empty answer at 2.0).
4. Frequency and presence penalties (OpenAI's definition, as vLLM applies them): subtract
   `frequency_penalty × count` and `presence_penalty × [count > 0]`, where count is the token's count
   in the OUTPUT only; prompt tokens are not penalised.
5. temperature == 0: greedy argmax (ties → lowest token id, `torch.argmax` returns the first
   maximum); the row draws no random number. Otherwise, in order:
6. Divide by temperature.
7. top_k (0 = off): keep every token whose logit is ≥ the k-th largest. Tokens tied with the k-th are
   all kept, as vLLM (`apply_top_k_only`) and HF (`TopKLogitsWarper`) do.
8. min_p (0 = off; vLLM's and HF's `min_p`, Nguyen et al. 2024): keep every token whose probability after
   temperature is ≥ min_p × the top token's. A cut relative to the max, as top_k is, so the two commute;
   before top_p, as vLLM applies it, so top_p's nucleus is taken of what min_p left.
9. top_p (1 = off): softmax over what is left, then keep the smallest set of highest-probability
   tokens whose cumulative probability is ≥ top_p (a token is kept iff the tokens ranked above it
   sum to < top_p: the same cut as vLLM's ascending `cumsum <= 1 - p`). The top token is always kept, so
   top_p = 0 (OpenAI's minimum) is the smallest nucleus: the most likely token alone, as greedy picks it.
   Ties at the cut are broken by lowest token id, so the set is deterministic (vLLM's is arbitrary).
10. Draw: an exponential race, as vLLM samples (`probs / Exp(1)`, argmax): token i gets its own
   E_i ~ Exp(1) and the largest p_i / E_i wins, which picks i with probability exactly p_i / Σp.
   It runs in two levels — first among 1024-token blocks (by token id) weighted by block mass,
   then among the winning block's tokens — so a row draws ceil(V/1024) + min(V, 1024) numbers
   per step (1,221 for gpt-oss), not V. A token removed by the mask, top_k, min_p or top_p has p = 0 and
   can never win.

Logprobs (OpenAI `logprobs` / `top_logprobs`): log_softmax over the logits after the mask, the bias and
the penalties, before temperature, top_k and top_p. Why: OpenAI's reported logprobs do not change with
temperature or top_p — they describe the model's distribution, not the sampling knobs — and vLLM's
default (`logprobs_mode="raw_logprobs"`) likewise ignores temperature/top-k/top-p. We do include the
mask (vLLM applies the grammar bitmask before its sampler, so its raw logprobs include it too) and the
penalties (vLLM's raw mode omits them), so the reported number is the distribution the request's
own settings define before the sampling knobs; with the default parameters (no penalties) the two
agree exactly. Top entries with logprob -inf (forbidden tokens) are left out: they are not
alternatives, and -inf is not valid JSON.

Randomness: a request with a seed owns a `torch.Generator` (created in `SamplingState`) and takes
the same fixed number of draws from it every sampled step, whatever the path and the batch, so its
tokens do not depend on what else is in the batch. Unseeded rows draw from the sampler's shared
generator, in one call. Greedy rows draw nothing. Why a race and not inverse-CDF with one uniform:
the batched forward changes a row's logits by ~1e-6 with the batch composition. Over a flat
distribution that can swap the two tokens at the top_p cut, and an inverse CDF in token-id order
then shifts every boundary between their ids by a token's width, so the same seed picks a
neighbouring token in another batch (it did, in the engine's test on the random tiny model). The
race changes its winner only if a swapped token was winning, or a block's mass moved by a token's
share of 1024 enough to reorder the top two blocks.

Greedy is temperature == 0 exactly (vLLM also treats temperature < 1e-5 as greedy; here a tiny
temperature still samples: the max is subtracted before dividing, so nothing overflows, and a
temperature below float32's range divides as float32's smallest normal, so nothing is 0/0).

Cost: besides O(batch) Python, each step touches only the biased tokens and the distinct tokens a penalised sequence has
seen (kept incrementally in `SamplingState`). Full-vocabulary work is a few vectorised passes over
the rows that need it, in a reused scratch buffer, and never a full sort: rows with top_k sample
among their `topk` candidates; top_p looks at the top 128 candidates and, for the rare row whose
nucleus is larger, at a mass histogram plus a sort of one narrow bin; the race needs one pass for
the block sums. `logits` are consumed (masked, penalised, then overwritten).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ossrun.engine.request import SamplingParams, TokenLogprob

_RACE_BLOCK = 1024  # tokens per block of the two-level race
_NUCLEUS_CANDIDATES = 128  # top_p candidates looked at first; larger nuclei go through a histogram


class ConstraintError(ValueError):
    """A structured-output mask allowed no token; `row` is the batch row, so the engine can fail
    just that request."""

    def __init__(self, row: int):
        self.row = row
        super().__init__("constraint allows no token")


class _Buffer:
    """A growable 1-D CPU tensor: `append` is amortised O(1) and `view` is zero-copy, so a
    sequence's penalty state is never rebuilt from its whole history."""

    __slots__ = ("data", "size")

    def __init__(self, dtype: torch.dtype, values: Sequence[int] = ()):
        self.data = torch.zeros(max(16, 2 * len(values)), dtype=dtype)
        self.data[: len(values)] = torch.tensor(values, dtype=dtype)
        self.size = len(values)

    def append(self, value: int | float) -> None:
        if self.size == self.data.numel():
            self.data = torch.cat([self.data, torch.zeros_like(self.data)])
        self.data[self.size] = value
        self.size += 1

    def view(self) -> torch.Tensor:
        return self.data[: self.size]


class SamplingState:
    """Per-request sampling state, owned by the engine's per-sequence object.

    `generator` is the request's own random stream when it has a seed (None: the sampler's shared
    one). Penalty bookkeeping exists only for the penalties the request uses: the distinct tokens
    seen in prompt or output (repetition penalty), and the distinct output tokens with their counts
    (frequency/presence). The prompt is read once, because the caller's list grows with the output.
    """

    __slots__ = ("params", "generator", "_seen", "_seen_ids", "_out_slot", "_out_ids", "_out_counts", "bias", "_exempt_from")

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int]):
        self.params = params
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            # manual_seed takes any 64-bit value; fold larger or negative seeds into that range.
            self.generator = torch.Generator().manual_seed(params.seed % 2**64)
        # logit_bias as (token ids long [n], biases float32 [n]), built once: a step only indexes with them.
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self.bias = (torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32))
        self._exempt_from = params.penalty_exempt_from
        self._seen: set[int] | None = None
        self._out_slot: dict[int, int] | None = None
        if params.repetition_penalty != 1.0:
            self._seen = {token for token in prompt_token_ids if self._penalised(token)}
            self._seen_ids = _Buffer(torch.long, sorted(self._seen))
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self._out_slot = {}
            self._out_ids = _Buffer(torch.long)
            self._out_counts = _Buffer(torch.float32)

    def _penalised(self, token_id: int) -> bool:
        return self._exempt_from is None or token_id < self._exempt_from

    def append(self, token_id: int) -> None:
        """Record a generated token: O(1)."""
        if not self._penalised(token_id):
            return
        if self._seen is not None and token_id not in self._seen:
            self._seen.add(token_id)
            self._seen_ids.append(token_id)
        if self._out_slot is not None:
            slot = self._out_slot.get(token_id)
            if slot is None:
                self._out_slot[token_id] = self._out_ids.size
                self._out_ids.append(token_id)
                self._out_counts.append(1.0)
            else:
                self._out_counts.data[slot] += 1.0

    def seen_ids(self) -> torch.Tensor | None:
        """Distinct tokens of prompt and output (long [n]); None when there is no repetition penalty."""
        return None if self._seen is None else self._seen_ids.view()

    def output_counts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(distinct output tokens long [n], their counts float [n]); None without freq/presence penalty."""
        return None if self._out_slot is None else (self._out_ids.view(), self._out_counts.view())


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # of the chosen token when params.logprobs, else None
    top_logprobs: list[tuple[TokenLogprob, ...]]  # params.top_logprobs entries, highest first, else ()


class Sampler:
    def __init__(self, seed: int | None = None):
        """`seed` seeds the shared generator that unseeded requests draw from (None: random)."""
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed % 2**64)
        # Reused [n, V] scratch rows: on CPU a fresh 50 MB tensor per step costs more in page
        # faults than the arithmetic done on it.
        self._scratch = torch.empty(0)

    def __call__(
        self, logits: torch.Tensor, states: list[SamplingState], masks: list[torch.Tensor | None] | None = None
    ) -> SamplerOutput:
        """Pick one token per row. logits [B, V] float32 (one row per sequence, same order as states),
        consumed: masked, penalised and overwritten in place. masks[i], when given, is a bool tensor
        [V] of ALLOWED tokens (structured output), or an int64 tensor of the FORBIDDEN ones' ids; forbidden
        tokens get -inf before anything else."""
        logits = logits.float().contiguous()
        if masks is not None:
            _apply_masks(logits, masks)
        _apply_bias(logits, states)
        _apply_penalties(logits, states)
        tokens = torch.empty(len(states), dtype=torch.long, device=logits.device)
        if any(s.params.greedy for s in states):
            tokens = logits.argmax(-1)  # every row: one pass, cheaper than gathering the greedy ones
        rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if rows:
            tokens[_index(rows, logits.device)] = self._sample(logits, rows, [states[i] for i in rows])
        logprobs, top = self._logprobs(logits, states, tokens)
        return SamplerOutput(tokens.tolist(), logprobs, top)

    def _sample(self, logits: torch.Tensor, rows: list[int], states: list[SamplingState]) -> torch.Tensor:
        """Draw for the non-greedy `rows` without writing `logits` → tokens long [len(rows)].
        Rows with top_k take the short path over their candidates; the others, and top_k rows with a
        tie at the k-th logit, take the long path over the whole vocabulary."""
        params, vocab = [s.params for s in states], logits.shape[1]
        noise = self._noise(states, vocab).to(logits.device)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        short = [j for j, p in enumerate(params) if 0 < p.top_k < vocab]
        long = [j for j, p in enumerate(params) if not 0 < p.top_k < vocab]
        if short:
            x = logits if len(short) == len(logits) else self._rows(logits, [rows[j] for j in short])
            picked, tied = _sample_top_k(x, [params[j] for j in short], noise[short])
            tokens[short] = picked
            long += [short[i] for i in tied.nonzero().flatten().tolist()]
        if long:
            long.sort(key=lambda j: params[j].top_p == 1.0)  # top_p rows first, so they are a view
            x = self._rows(logits, [rows[j] for j in long])
            tokens[long] = _sample_full(x, [params[j] for j in long], noise[long])
        return tokens

    def _rows(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """A copy of logits[rows] in the reused scratch buffer → [len(rows), V]."""
        n, vocab = len(rows), logits.shape[1]
        scratch = self._scratch
        if scratch.device != logits.device or scratch.shape[1:] != (vocab,) or scratch.shape[0] < n:
            scratch = self._scratch = torch.empty(max(n, scratch.shape[0]), vocab, device=logits.device)
        return torch.index_select(logits, 0, _index(rows, logits.device), out=scratch[:n])

    def _noise(self, states: list[SamplingState], vocab: int) -> torch.Tensor:
        """The race's Exp(1) draws, float64 [n, blocks + block size], the same count for every row:
        from the row's own generator when seeded (so its draws do not depend on the batch), else
        from the shared one in a single call."""
        noise = torch.empty(len(states), _race_width(vocab), dtype=torch.float64)
        shared = [i for i, s in enumerate(states) if s.generator is None]
        if shared:
            noise[shared] = noise[shared].exponential_(generator=self.generator)
        for i, s in enumerate(states):
            if s.generator is not None:
                noise[i].exponential_(generator=s.generator)
        return noise.clamp_(min=1e-300)  # an exact 0 would turn a removed token's 0 / 0 into NaN

    def _logprobs(
        self, logits: torch.Tensor, states: list[SamplingState], tokens: torch.Tensor
    ) -> tuple[list[float | None], list[tuple[TokenLogprob, ...]]]:
        """The chosen token's logprob and the top-N alternatives, for rows that asked, from the logits
        after mask and penalties (see the module docstring): logprob = logit − logsumexp(row)."""
        rows = [i for i, s in enumerate(states) if s.params.logprobs]
        logprobs: list[float | None] = [None] * len(states)
        top: list[tuple[TokenLogprob, ...]] = [()] * len(states)
        if not rows:
            return logprobs, top
        x = logits if len(rows) == len(states) else self._rows(logits, rows)
        chosen = x.gather(1, tokens[_index(rows, x.device)][:, None])
        n = max(states[i].params.top_logprobs for i in rows)
        values, ids = x.topk(n, dim=-1)  # n = 0 gives empty rows
        lse = _logsumexp_(x)
        chosen, values, ids = (chosen - lse).squeeze(1).tolist(), (values - lse).tolist(), ids.tolist()
        for j, i in enumerate(rows):
            logprobs[i] = chosen[j]
            pairs = zip(ids[j][: states[i].params.top_logprobs], values[j])
            top[i] = tuple(TokenLogprob(t, v) for t, v in pairs if v != float("-inf"))
        return logprobs, top


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _on_rows(x: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor], object]) -> None:
    """Apply the in-place `fn` to x[rows]: directly when that is every row, else via a copy."""
    if len(rows) == x.shape[0]:
        fn(x)
        return
    index = _index(rows, x.device)
    sub = x[index]
    fn(sub)
    x[index] = sub


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim → [n, 1], overwriting x (torch.logsumexp allocates a full copy)."""
    peak = x.amax(-1, keepdim=True)
    return peak + x.sub_(peak).exp_().sum(-1, keepdim=True).log()


# -- mask and penalties: in place on the logits ----------------------------------------------


def _apply_masks(logits: torch.Tensor, masks: list[torch.Tensor | None]) -> None:
    """-inf on every forbidden token; raise `ConstraintError` first if some mask allows nothing. A mask is the allowed
    tokens (bool [V]) or, where only a few are forbidden (a grammar's free text: the special tokens), the forbidden
    ones' ids (int64): one indexed fill for all such rows, where a bool mask costs passes over every row's vocabulary
    (0.6 ms a row on one CPU thread, for a token of the demo model that takes 4)."""
    sparse = [(i, m) for i, m in enumerate(masks) if m is not None and m.dtype != torch.bool]
    if sparse:
        vocab = logits.shape[1]
        index = torch.cat([m + i * vocab for i, m in sparse]).to(logits.device)
        logits.view(-1).index_fill_(0, index, float("-inf"))
    rows = [i for i, m in enumerate(masks) if m is not None and m.dtype == torch.bool]
    if not rows:
        return
    allowed = torch.stack([masks[i] for i in rows]).to(device=logits.device, dtype=torch.bool)
    empty = (~allowed.any(-1)).nonzero()
    if empty.numel():
        raise ConstraintError(rows[int(empty[0, 0])])
    _on_rows(logits, rows, lambda sub: sub.masked_fill_(~allowed, float("-inf")))


def _apply_bias(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """logit_bias, in place: every biased row's tokens in one indexed add (-inf, a masked token, stays -inf)."""
    rows = [(i, *s.bias) for i, s in enumerate(states) if s.bias is not None]
    if rows:
        index, values = _flat_index(rows, logits.shape[1], logits.device)
        logits.view(-1)[index] += values  # a row's ids are distinct, so no two updates collide


def _apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Repetition penalty, then frequency/presence, in place; touches only the tokens each
    penalised row has seen, all rows in one indexed op per penalty."""
    vocab, flat = logits.shape[1], logits.view(-1)
    repeated = _repetition_rows(states)
    if repeated:
        index, penalty = _flat_index(repeated, vocab, logits.device)
        values = flat[index]
        # A penalty near 0 (7e-39 is in Workers AI's range) divides past float32: the largest finite logit instead
        # of +inf, whose softmax is NaN.
        largest = torch.finfo(flat.dtype).max
        flat[index] = torch.where(values > 0, values / penalty, values * penalty).clamp_(min=-largest, max=largest)
    counted = _output_rows(states)
    if counted:
        index, amount = _flat_index(counted, vocab, logits.device)
        flat[index] -= amount  # indices are distinct within a row, so no two updates collide


def _repetition_rows(states: list[SamplingState]) -> list[tuple[int, torch.Tensor, float]]:
    """(row, distinct tokens seen, penalty) for the rows with a repetition penalty to apply."""
    rows = []
    for i, s in enumerate(states):
        seen = s.seen_ids()
        if seen is not None and seen.numel():
            rows.append((i, seen, s.params.repetition_penalty))
    return rows


def _output_rows(states: list[SamplingState]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(row, distinct output tokens, amount to subtract from each) for rows with freq/presence."""
    rows = []
    for i, s in enumerate(states):
        counts = s.output_counts()
        if counts is not None and counts[0].numel():
            p = s.params
            rows.append((i, counts[0], counts[1] * p.frequency_penalty + p.presence_penalty))
    return rows


def _flat_index(rows: list, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[(row, token ids [n], one value per token or per row)] → (indices into logits.view(-1), values)."""
    index = torch.cat([ids + row * vocab for row, ids, _ in rows])
    values = torch.cat([v if isinstance(v, torch.Tensor) else torch.full((ids.numel(),), v) for _, ids, v in rows])
    return index.to(device), values.to(device=device, dtype=torch.float32)


# -- short path: rows with top_k, on their candidates only -------------------------------------


def _sample_top_k(logits: torch.Tensor, params: list[SamplingParams], noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature → top_k → min_p → top_p → race, on each row's k candidates (logits [n, V] not written),
    with exactly the outcome of the long path. → (tokens [n], tied [n]): rows whose k-th logit ties
    the next are not decided here."""
    device = logits.device
    k = torch.tensor([p.top_k for p in params], device=device)
    values, ids = logits.topk(int(k.max()) + 1, dim=-1)  # descending; + 1 to see a tie at the k-th
    tied = (values.gather(1, (k - 1)[:, None]) == values.gather(1, k[:, None])).squeeze(1)
    in_top_k = torch.arange(values.shape[1], device=device) < k[:, None]
    ids, order = ids.sort(-1)  # token-id order: the order the draw walks in
    values, in_top_k = values.gather(1, order), in_top_k.gather(1, order)
    temperature = _temperatures(params, device)
    e = ((values - values.amax(-1, keepdim=True)) / temperature).exp() * in_top_k  # as the long path
    if any(p.min_p > 0 for p in params):
        _apply_min_p(e, params)
    if any(p.top_p < 1.0 for p in params):
        e = _top_p_in_id_order(e, torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device))
    return _race_sparse(e, ids, logits.shape[1], noise), tied


def _top_p_in_id_order(e: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """e [m candidates, token-id order] with everything outside each row's nucleus zeroed. A stable
    descending sort ranks ties by lowest id; top_p = 1 keeps every candidate."""
    m = e.shape[1]
    ranked, order = torch.sort(e, dim=-1, descending=True, stable=True)
    cum = ranked.double().cumsum(-1)
    last = torch.searchsorted(cum, top_p[:, None] * cum[:, -1:]).squeeze(1)  # first cum ≥ top_p
    last = torch.where(top_p < 1.0, last.clamp(max=m - 1), m - 1)
    keep = torch.arange(m, device=e.device) <= last[:, None]
    return e * torch.zeros_like(keep).scatter(1, order, keep)


# -- long path: the whole vocabulary ---------------------------------------------------------


def _sample_full(x: torch.Tensor, params: list[SamplingParams], noise: torch.Tensor) -> torch.Tensor:
    """Temperature → top_k → min_p → top_p → race, in place on x [n, V], whose rows with top_p < 1 come first."""
    vocab = x.shape[1]
    x.sub_(x.amax(-1, keepdim=True))  # first, so that a tiny temperature cannot overflow
    if any(p.temperature != 1.0 for p in params):
        x.div_(_temperatures(params, x.device))
    k_rows = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]  # only rows with a k-th tie
    if k_rows:
        k = torch.tensor([params[i].top_k for i in k_rows], device=x.device)
        _on_rows(x, k_rows, lambda sub: _apply_top_k(sub, k))
    x.exp_()  # unnormalised probabilities; the max becomes exactly 1
    if any(p.min_p > 0 for p in params):
        _apply_min_p(x, params)
    n_p = sum(p.top_p < 1.0 for p in params)
    if n_p:
        _apply_top_p(x[:n_p], torch.tensor([p.top_p for p in params[:n_p]], dtype=torch.float64, device=x.device))
    return _race(x, noise)


def _temperatures(params: list[SamplingParams], device: torch.device) -> torch.Tensor:
    """Each row's temperature [n, 1] as a float32 divisor. A positive temperature below float32's
    smallest normal (the API allows any positive float) would round to 0 and turn the max logit into
    0/0 = NaN; raised to that smallest normal, the max still maps to 0 and the rest to -inf."""
    tiny = torch.finfo(torch.float32).tiny
    return torch.tensor([max(p.temperature, tiny) for p in params], device=device)[:, None]


def _apply_top_k(x: torch.Tensor, k: torch.Tensor) -> None:
    """-inf below each row's k-th largest logit (x [n, V], k long [n]); ties with the k-th stay."""
    kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
    x.masked_fill_(x < kth, float("-inf"))


def _apply_min_p(e: torch.Tensor, params: list[SamplingParams]) -> None:
    """Zero every unnormalised probability below its row's min_p (e [n, m], each row's max exactly 1, so p / p_max
    is e itself). The top token always stays: its e is 1 ≥ any min_p."""
    min_p = torch.tensor([p.min_p for p in params], dtype=e.dtype, device=e.device)[:, None]
    e.masked_fill_(e < min_p, 0.0)


def _apply_top_p(e: torch.Tensor, top_p: torch.Tensor) -> None:
    """Zero every unnormalised probability outside its row's nucleus (e [n, V], top_p float64 [n])."""
    target = top_p * e.sum(-1).double()
    cutoff, ties_kept, check = _nucleus_cutoff(e, target)
    e.masked_fill_(e < cutoff[:, None], 0.0)
    for row in check.nonzero().flatten().tolist():
        # Rare: more tokens tie at the cut than the nucleus needs; keep the lowest ids.
        tied = (e[row] == cutoff[row]).nonzero().flatten()
        e[row, tied[int(ties_kept[row]):]] = 0.0


def _nucleus_cutoff(e: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the probability c of the nucleus's last token, how many tokens equal to c the
    nucleus holds, and whether more than that tie at c. The top candidates settle most rows (an
    LLM's nucleus is usually small); a row whose nucleus is larger is settled by a histogram."""
    k = min(_NUCLEUS_CANDIDATES, e.shape[1])
    cutoff, ties_kept, check, found = _cut(e.topk(k, dim=-1).values, target, complete=k == e.shape[1])
    for row in (~found).nonzero().flatten().tolist():
        cutoff[row], ties_kept[row], check[row] = _histogram_cut(e[row], float(target[row]))
    return cutoff, ties_kept, check


def _cut(values: torch.Tensor, target: torch.Tensor, complete: bool) -> tuple[torch.Tensor, ...]:
    """Where the nucleus ends within candidate values [n, m] (descending, the row's largest; all of
    the row when `complete`) → (cutoff c, ties at c kept, more ties at c than kept?, found?)."""
    m = values.shape[1]
    cum = values.double().cumsum(-1)
    last = torch.searchsorted(cum, target[:, None]).squeeze(1)  # first cum ≥ target
    found = (last < m) | (values[:, -1] == 0) | complete  # the nucleus, or all that is left, is here
    # Past the end only through rounding (top_p ≈ 1): keep every positive token.
    last = torch.minimum(last.clamp(max=m - 1), (values > 0).sum(-1) - 1)
    cutoff = values.gather(1, last[:, None])
    kept = last + 1 - (values > cutoff).sum(-1)
    outside = (values[:, -1:] == cutoff).squeeze(1) & (not complete)  # ties may go on past the candidates
    return cutoff.squeeze(1), kept, ((values == cutoff).sum(-1) > kept) | outside, found


def _histogram_cut(row: torch.Tensor, target: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_cut` for one row [V] with a large nucleus: a mass histogram over the top 16 bits of the
    float32 values (monotone for values ≥ 0) finds the bin holding the cut, and only that bin is
    sorted, instead of the whole nucleus."""
    key = row.view(torch.int32) >> 16
    above = torch.bincount(key, weights=row.double()).flip(0).cumsum(0).flip(0)  # mass of bins ≥ b
    enough = (above >= target).nonzero()
    if not enough.numel():  # only through rounding (top_p ≈ 1): keep every positive token
        return row[row > 0].min(), torch.tensor(0), torch.tensor(False)
    b = int(enough[-1])
    rest = target - (float(above[b + 1]) if b + 1 < above.numel() else 0.0)
    values = row[key == b].sort(descending=True).values[None]
    cutoff, kept, more, _ = _cut(values, torch.tensor([rest], dtype=torch.float64, device=row.device), complete=True)
    return cutoff[0], kept[0], more[0]


def _race_width(vocab: int) -> int:
    """Draws per row per step: one per block, then one per token of the winning block."""
    block = min(_RACE_BLOCK, vocab)
    return -(-vocab // block) + block


def _race(e: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The race over e [n, V] (unnormalised probabilities ≥ 0) → tokens [n]. Level one: block b
    scores mass_b / noise[b]; level two: token i of the winning block scores e_i / noise[blocks + i
    mod block]. Block sums are float32 inside a block (fast; relative error ~1e-7), float64 after."""
    n, vocab = e.shape
    block = min(_RACE_BLOCK, vocab)
    whole = vocab // block * block
    sums = e[:, :whole].reshape(n, -1, block).sum(-1)
    if whole < vocab:
        sums = torch.cat([sums, e[:, whole:].sum(-1, keepdim=True)], dim=1)
    blocks = sums.shape[1]
    winner = (sums.double() / noise[:, :blocks]).argmax(-1)
    columns = winner[:, None] * block + torch.arange(block, device=e.device)
    local = e.gather(1, columns.clamp(max=vocab - 1)).double() * (columns < vocab)
    return winner * block + (local / noise[:, blocks:]).argmax(-1)


def _race_sparse(e: torch.Tensor, ids: torch.Tensor, vocab: int, noise: torch.Tensor) -> torch.Tensor:
    """`_race` for rows whose only positive entries are the candidates e [n, m] at token ids [n, m]:
    the same block masses (summed in float64 here) and the same draws, so the same winner."""
    block = min(_RACE_BLOCK, vocab)
    blocks = -(-vocab // block)
    of_block = ids // block
    masses = torch.zeros(e.shape[0], blocks, dtype=torch.float64, device=e.device).scatter_add_(1, of_block, e.double())
    winner = (masses / noise[:, :blocks]).argmax(-1)
    score = e.double() / noise.gather(1, blocks + ids % block)
    score = torch.where(of_block == winner[:, None], score, -1.0)
    return ids.gather(1, score.argmax(-1, keepdim=True)).squeeze(1)
