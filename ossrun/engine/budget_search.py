"""The budget search of structured output: a short way from a grammar state to a complete output.

A grammar with `max_tokens` must be complete within it (`constraints.py` says how the engine keeps that promise).
What it needs from here: `shortest_completion` (a bounded breadth-first search over the real masks, from a state to a
final token, retokenized; None only when a search of every allowed token proves there is none), `completion_within`
(the same, cheap and bounded, for checking one sampled token near the end), and the candidate tokens a search tries
(`search_candidates`, `short_tokens`, `run_tokens`). The search runs on llguidance matchers alone: no model, no engine.
"""

from __future__ import annotations

import time

import llguidance
import torch

from ossrun.engine.grammar import Grammar, GrammarError

# The wide check of a sampled token (`completion_within`) creates at most this many states (measured: ~50 ms on 2
# busy cores when it finds nothing).
_CHECK_STATES = 256
_RETOKENIZED_GAIN, _RETOKENIZED_RATIO = 2, 2
# How deep in JSON a state is: (brackets open, inside a string, after a backslash in it); see `nested`.
Nesting = tuple[int, bool, bool]
# Token spellings of the ends of a format's pattern samples, each with the closing quote (see `_Node.ending`).
Endings = tuple[tuple[int, ...], ...]
TOP: Nesting = (0, False, False)
# The search keeps this many states a step, and gives up after this many seconds (it then finds no path). From each
# state it tries candidates until it has this many children that made progress, or has tried this many.
_SEARCH_WIDTH, _SEARCH_SECONDS = 16, 2.0
_SEARCH_PROGRESS, _SEARCH_TRIES = 2, 8
# When the beam finds no answer within the limit, a search of every token the masks allow tries to prove there is none,
# creating at most this many states (enough for a small budget); past that, nothing is known.
_PROOF_STATES = 400


class SearchTimeout(Exception):
    """The shortest-completion search ran out of time before it ended: whether a path exists is not known. Unlike
    None (the search ended and found none within the limit), this depends on how busy the machine is, so it is
    never a 400 and never cached: the request runs without the budget guarantee, as the log says."""


class SearchPruned(SearchTimeout):
    """The beam found no answer within the limit, and the search of every allowed token was too large to end: the
    beam drops states, so whether one exists is not known. Never a 400: the request runs without the guarantee."""


def shortest_completion(matcher: llguidance.LLMatcher, grammar: Grammar, candidates: torch.Tensor,
                        tokenizer: llguidance.LLTokenizer, *, limit: int | None = None,
                        runs: frozenset[int] = frozenset(), nesting: Nesting = TOP, endings: Endings = ()) -> list[int] | None:
    """A short token path from the matcher's state to a complete output (ending in a final token) of at most `limit`
    tokens (default: the grammar's max_tokens), or None when there is none: only when that is proven, by a search of
    every token the masks allow (`_prove_none`). A beam that found none proves nothing: SearchPruned then.
    `runs`: the multi-character tokens among the candidates; `nesting`: how deep in JSON the state is; `endings`: ways to
    close a string that follows a pattern (`_Node.ending`). The path comes as the tokenizer spells it (`retokenized`),
    and the beams go _RETOKENIZED_RATIO times deeper than `limit`: they spell in short tokens (`"k` `31` `"` `:` and
    a `}` a token), about twice as many as the same text takes (objects nested 32 deep: 228 tokens, 118 retokenized).
    """
    limit = limit if limit is not None else grammar.max_tokens
    deadline = time.monotonic() + _SEARCH_SECONDS  # on a busy machine it may run out: SearchTimeout, not None
    # First with the runs (short paths for dates, numbers); a format bounded in length (an email) makes each longer run
    # look like progress, and that beam may never reach its `@`: then again without them, in the time left.
    without = candidates[~torch.isin(candidates, torch.tensor(sorted(runs), dtype=torch.int64))]
    path, timed_out = None, None
    for tries, until in ((candidates, time.monotonic() + _SEARCH_SECONDS / 2), (without, deadline)):
        try:
            found = _beam_search(matcher, grammar, tries, tokenizer, None if limit is None else limit * _RETOKENIZED_RATIO,
                                 min(until, deadline), nesting=nesting, endings=endings)
        except SearchTimeout as exc:
            timed_out = exc
            continue
        found = None if found is None else retokenized(matcher, tokenizer, found)
        if found is not None and (path is None or len(found) < len(path)):
            path = found
        if path is not None and (limit is None or len(path) <= limit) or not runs:
            break
    if path is not None and (limit is None or len(path) <= limit):
        return path
    if timed_out is not None and path is None:
        raise timed_out
    if limit is None:
        return None
    return _prove_none(matcher, grammar, tokenizer.vocab_size, limit, deadline)


def completion_within(matcher: llguidance.LLMatcher, grammar: Grammar, candidates: torch.Tensor,
                      tokenizer: llguidance.LLTokenizer, limit: int, deadline: float, wide: bool = True,
                      nesting: Nesting = TOP, endings: Endings = ()) -> list[int] | None:
    """A path from the matcher's state to a complete output of at most `limit` tokens (retokenized), or None when
    the bounded search finds none before `deadline` (which proves nothing). For checking a token a step, so cheap
    first: a beam one state wide (a few dozen masks) finds most; then, when `wide`, one _SEARCH_WIDTH wide of at
    most _CHECK_STATES states finds shorter paths it missed. The beams may go _RETOKENIZED_GAIN tokens deeper than
    `limit`: retokenizing shortens paths."""
    for width, states in ((1, None), (_SEARCH_WIDTH, _CHECK_STATES))[:2 if wide else 1]:
        try:
            path = _beam_search(matcher, grammar, candidates, tokenizer, limit + _RETOKENIZED_GAIN, deadline,
                                width=width, max_states=states, nesting=nesting, endings=endings)
        except (GrammarError, SearchTimeout):
            path = None
        if path is not None:
            path = retokenized(matcher, tokenizer, path)
            if len(path) <= limit:
                return path
    return None


def retokenized(matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, path: list[int]) -> list[int]:
    """The path's text as the tokenizer spells it (`","` `capital` for the search's `"` `,` `"` `capital`), when that
    is shorter and valid from the matcher's state: the room an answer needs as a model spends it, not as the search's
    single characters do. Special tokens stay; the text between them is tokenized again (~10 µs)."""
    out, text = [], bytearray()
    for token in path:
        if tokenizer.is_special_token(token):
            out += tokenizer.tokenize_bytes(bytes(text)) if text else []
            out.append(token)
            text.clear()
        else:
            text += tokenizer.decode_bytes([token])
    out += tokenizer.tokenize_bytes(bytes(text)) if text else []
    return out if len(out) < len(path) and matcher.validate_tokens(out) == len(out) else path


def _prove_none(matcher: llguidance.LLMatcher, grammar: Grammar, vocab_size: int, limit: int, deadline: float) -> list[int] | None:
    """Breadth first over every token each mask allows, without a beam: a path of at most `limit` tokens, or None when
    there is none (proven: every state that could still finish within the limit was expanded). SearchPruned when that
    takes more than _PROOF_STATES states (or the search's time)."""
    bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
    everything = torch.arange(vocab_size, dtype=torch.int64)
    frontier, states = [_Node(matcher.deep_copy(), [])], 0
    done = frontier[0].settle(grammar, bits, everything)
    if done is not None:
        return done if len(done) <= limit else None
    while frontier:
        children = []
        for node in frontier:
            if len(node.path) + 2 > limit:  # its children need one more token (a final one) at least
                continue
            states += len(node.allowed)
            if states > _PROOF_STATES or time.monotonic() > deadline:
                raise SearchPruned(f"no complete answer of at most {limit} tokens found, and too many to try them all")
            for token in node.allowed:
                child = node.state.deep_copy()
                if not child.consume_token(token):
                    raise GrammarError(matcher_error(child))
                child_node = _Node(child, node.path + [token])
                done = child_node.settle(grammar, bits, everything)
                if done is not None:
                    if len(done) <= limit:
                        return done
                    continue  # its shortest completion is too long: a dead end, nothing dropped
                children.append(child_node)
        frontier = children
    return None


def _beam_search(matcher: llguidance.LLMatcher, grammar: Grammar, candidates: torch.Tensor, tokenizer: llguidance.LLTokenizer,
                 limit: int | None, deadline: float, *, width: int | None = None, max_states: int | None = None,
                 nesting: Nesting = TOP, endings: Endings = ()) -> list[int] | None:
    """A short path (maybe longer than `limit`), or None when the beam found none within it.

    Breadth first with a beam. A state's forced tokens are taken at once; otherwise its real mask (what
    generation computes there) says which of `candidates` (token ids in the order to try them: see
    `search_candidates`) it allows. A child whose mask or JSON nesting differs from its parent's made progress (closed
    a string, reached the `@` of an email, closed one of nested objects); one with both its parent's only repeated itself (one more
    character of the same string): a state keeps one such child, which goes on trying the tokens its
    parent did not, and only when the beam has room. A grammar error on the way,
    such as a parser limit, raises GrammarError: generation would hit it too. Past the deadline (checked each step)
    SearchTimeout. `width`: states kept a step (default _SEARCH_WIDTH); with `max_states`, past that many states
    created or the deadline (then checked before each: a mask may take 0.5 s at 5000 properties), SearchPruned.
    `nesting`: how deep in JSON the matcher's state is (`nested`). Inside a string, the first child a state tries is
    one of `endings` that closes it (`_Node.ending`), when one does."""
    width = width or _SEARCH_WIDTH
    bits = torch.zeros((tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
    start = _Node(matcher.deep_copy(), [], nesting)
    done = start.settle(grammar, bits, candidates, tokenizer)
    if done is not None:
        return done
    frontier, states = [start], 0
    while frontier:
        if time.monotonic() > deadline:
            raise SearchTimeout(f"no complete answer found in {_SEARCH_SECONDS:g} s (the search did not end)")
        progress: list[list[_Node]] = []
        repeats: list[list[_Node]] = []
        for node in frontier:
            if limit is not None and len(node.path) >= limit:
                continue
            moved, same = [], []
            ending = node.ending(endings)
            if ending is not None:  # it closes the string: progress
                states += 1
                child_node = node.child(ending, tokenizer)
                done = child_node.settle(grammar, bits, candidates, tokenizer)
                if done is not None:
                    return done
                moved.append(child_node)
            for index in range(node.next, min(len(node.allowed), node.next + _SEARCH_TRIES)):
                states += 1
                if max_states is not None and (states > max_states or time.monotonic() > deadline):  # a bounded check
                    raise SearchPruned(f"no complete answer found within {max_states} states or the time")
                child_node = node.child([node.allowed[index]], tokenizer)
                done = child_node.settle(grammar, bits, candidates, tokenizer)
                if done is not None:
                    return done
                if child_node.key != node.key or child_node.nesting[0] != node.nesting[0]:
                    moved.append(child_node)
                elif not same:
                    same.append(child_node)
                if len(moved) >= _SEARCH_PROGRESS:
                    break
            if same:  # the same mask allows the same tokens: the repeat goes on with those not tried yet
                same[0].next = (index + 1) % len(node.allowed)
            progress.append(moved)
            repeats.append(same)
        frontier = _round_robin(progress, width)
        frontier += _round_robin(repeats, width - len(frontier))
    return None


class _Node:
    """A state of the search: its matcher, the path that reached it, how deep in JSON that path is, and (once
    settled) its mask's key and the candidates it allows."""

    def __init__(self, state: llguidance.LLMatcher, path: list[int], nesting: Nesting = TOP):
        self.state, self.path = state, path
        self.key = 0
        self.allowed: list[int] = []
        self.next = 0  # the first of `allowed` to try (a repeat goes on from where its parent stopped)
        self.nesting = nesting  # how deep in JSON the state is (see `nested`)

    def took(self, tokens: list[int], tokenizer: llguidance.LLTokenizer | None) -> _Node:
        """The node after `tokens` (already consumed by its state): its path, and its nesting unless no tokenizer."""
        self.path = self.path + tokens
        if tokenizer is not None:
            self.nesting = nested(self.nesting, tokens, tokenizer)
        return self

    def child(self, tokens: list[int], tokenizer: llguidance.LLTokenizer) -> _Node:
        """The node after `tokens`, not settled yet."""
        state = self.state.deep_copy()
        if not state.consume_tokens(tokens):
            raise GrammarError(matcher_error(state))
        return _Node(state, self.path, self.nesting).took(tokens, tokenizer)

    def ending(self, endings: Endings) -> list[int] | None:
        """Inside a string, the first of `endings` (token spellings of the ends of a pattern's sample, each with the
        closing quote: `.aa"`, `a.aa"`, ... for an e-mail's `a@a.aa`) valid from this state, if any: a child that
        closes the string where trying one character at a time would not see the way, the mask being the same after
        each (see `pattern_sample`). Checked without masks (~1 µs each)."""
        if not endings or not self.nesting[1] or self.nesting[2]:
            return None
        return next((list(e) for e in endings if self.state.validate_tokens(list(e)) == len(e)), None)

    def settle(self, grammar: Grammar, bits: torch.Tensor, candidates: torch.Tensor,
               tokenizer: llguidance.LLTokenizer | None = None) -> list[int] | None:
        """Take the forced tokens and compute the mask; → the complete path when a final token was reached.
        `tokenizer`: to follow the nesting (the beam's; the proof needs none)."""
        forced = self.state.compute_ff_tokens()
        for i, token in enumerate(forced):
            if token in grammar.final_tokens:
                return self.path + forced[:i + 1]
        if forced:
            if not self.state.consume_tokens(forced):
                raise GrammarError(matcher_error(self.state))
            self.took(forced, tokenizer)
        self.state.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
        if self.state.is_error():
            raise GrammarError(matcher_error(self.state))
        self.key = hash(bits.numpy().tobytes())
        self.allowed = candidates[((bits[candidates >> 5] >> (candidates & 31)) & 1).bool()].tolist()
        for token in self.allowed:
            if token in grammar.final_tokens:
                return self.path + [token]
        return None


def nested(nesting: Nesting, tokens: list[int], tokenizer: llguidance.LLTokenizer) -> Nesting:
    """(brackets open, inside a string, after a backslash in it) after `tokens`, from `nesting` before them: how deep
    in JSON their text is (JSON starts afresh after a special token: a harmony header, `<|message|>`). A mask does not
    show it: after each `}` closing one of nested objects the mask is the same, so the beam took those closers for a
    string's next character (no progress) and lost the way out of objects nested 6 or more deep (other paths, such as
    `,` to a property the schema does not name, looked like progress). Inside a string a `}` is text: a search that
    starts there is given the nesting so far (`Constraint` follows it), else it would take each `}` for progress."""
    brackets, quoted, escaped = nesting
    for token in tokens:
        if tokenizer.is_special_token(token):
            brackets, quoted, escaped = TOP
            continue
        for byte in tokenizer.decode_bytes([token]):
            if escaped:
                escaped = False
            elif quoted:
                escaped, quoted = byte == 0x5C, byte != 0x22  # a backslash; the closing quote
            elif byte == 0x22:
                quoted = True
            elif byte in b"{[":
                brackets += 1
            elif byte in b"}]":
                brackets -= 1
    return brackets, quoted, escaped


def _round_robin(groups: list[list[_Node]], width: int) -> list[_Node]:
    """The first of each group, then the second of each, ... up to `width` (no state's children fill the beam alone)."""
    out: list[_Node] = []
    for rank in range(max((len(g) for g in groups), default=0)):
        for group in groups:
            if rank < len(group) and len(out) < width:
                out.append(group[rank])
    return out


def search_candidates(grammar: Grammar, short: torch.Tensor, blank: torch.Tensor, alnum: torch.Tensor) -> torch.Tensor:
    """What the search tries at a state, in order: the grammar's path tokens (closers, names), then the tokenizer's
    short tokens (`short`: runs of digits and letters, longest first, then single characters), whitespace last
    (`blank`: JSON allows it almost anywhere, and a beam of whitespace runs finds long paths). A path token that
    is a single digit, letter or `-` (`alnum`: the closers `0`, `1`, `-`) keeps its place among the short ones, after
    the runs (else `-` `10` beats `10` for an integer, and `0` `1` beats `01` for a month). Each token once: the
    closers and a schema's hints share some (`"`), and a token tried twice gives a state two identical children."""
    path = torch.tensor(list(dict.fromkeys(grammar.path_tokens)), dtype=torch.int64)
    first = path[~torch.isin(path, blank) & ~torch.isin(path, alnum)]
    rest = short[~torch.isin(short, first)]
    return torch.cat([first, rest[~torch.isin(rest, blank)], rest[torch.isin(rest, blank)]])


def short_tokens(tokenizer: llguidance.LLTokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the tokenizer's short tokens in the order the search tries them, the whitespace among them, the single
    digits, letters and `-` among them). Runs of 2 or 3 of the digits 0, 1 and 2 come first, longest first (o200k spells
    0 to 999 in one token: `2000-01-01` takes 6 tokens, not 10; these 36 runs suffice for dates, times and most
    numeric patterns, and a state that only repeats itself tries few of them before the single characters),
    then the single-byte tokens: digits and letters, punctuation, whitespace and control bytes."""
    single, runs = {}, []
    for token in range(tokenizer.vocab_size):
        if not tokenizer.is_special_token(token):
            text = tokenizer.decode_bytes([token])
            if len(text) == 1:
                single.setdefault(text[0], token)
            elif len(text) <= 3 and set(text) <= set(b"012"):
                runs.append((-len(text), text, token))
    def rank(byte: int) -> tuple[int, int]:
        char = chr(byte)
        return (0 if char.isascii() and char.isalnum() else 1 if 0x21 <= byte < 0x7F else 2, byte)
    ordered = [token for *_, token in sorted(runs)] + [single[b] for b in sorted(single, key=rank)]
    blank = [single[b] for b in single if chr(b) in " \t\n\r"]
    alnum = [single[b] for b in single if rank(b)[0] == 0 or b == ord("-")]
    return tuple(torch.tensor(t, dtype=torch.int64) for t in (ordered, blank, alnum))


def run_tokens(short: torch.Tensor, tokenizer: llguidance.LLTokenizer) -> frozenset[int]:
    """The multi-character tokens among `short`."""
    return frozenset(t for t in short.tolist() if len(tokenizer.decode_bytes([t])) > 1)


def matcher_error(matcher: llguidance.LLMatcher) -> str:
    """The first line of the matcher's error (the rest is a `<non-verbose/>` placeholder)."""
    return (matcher.get_error() or "rejected").splitlines()[0]
