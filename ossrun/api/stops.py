"""Stop strings, applied to the answer's text where it is decoded: cut at the first match, never shown.

The engine's own stop-string check sees every decoded byte (harmony headers included) and can only
end generation after the token that completed the match, so the match and whatever followed it in
that token would reach the client. Here the answer text (`ContentDelta`s) passes through a matcher
that holds back any tail that could still become a stop string, cuts the text at the first match and
reports which stop it was; the caller then ends the engine request.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from ossrun.harmony import ContentDelta, Event, Finished, MessageEnd


@lru_cache(maxsize=16)
def _failure_table(stop: str) -> tuple[int, ...]:
    """[i]: the longest proper prefix of stop[:i + 1] that is also its suffix. Built once per stop string and shared by
    every choice that uses it: built per choice (a prompt list × `n`: up to 256) on the event loop, four stop strings of
    200k characters froze the server for 137 s."""
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return tuple(fail)


class _Prefixes:
    """One stop string's Knuth-Morris-Pratt automaton: after each character of the text, how long a prefix of the
    stop the text ends with. A character costs O(1) amortised, however long the stop and the held-back tail: the
    obvious check (does the text end with stop[:k], for every k) cost O(held²) a token, so a long stop string the
    answer kept half-matching froze the event loop (cubic in the answer's length)."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0
        self._fail = _failure_table(stop)

    def step(self, char: str) -> bool:
        """Advance by one character; True when the stop string has just been completed."""
        k = self.state
        if k == len(self.stop):
            k = self._fail[k - 1]
        while k and char != self.stop[k]:
            k = self._fail[k - 1]
        if char == self.stop[k]:
            k += 1
        self.state = k
        return k == len(self.stop)


class StopStrings:
    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        self.matched: str | None = None  # the stop string that ended the text, once one did
        self._held = ""  # a tail that is a prefix of some stop string: not yet safe to show
        self._automata = [_Prefixes(stop) for stop in self.stops]

    def feed(self, text: str) -> str:
        """The part of `text` (after what was held back) that can be shown now. The first match to complete wins, as
        generation stops as soon as a stop string appears, so which stop ends the text does not depend on how it was
        split into tokens (it did when the earliest start within one piece won: `["s Pa", "France is Paris"]` cut
        "France is Paris." before "France" or in "is" by where a token ended). Of matches completed by the same
        character, the one that starts first (the longer)."""
        if self.matched is not None:
            return ""
        start = len(self._held)
        text, self._held = self._held + text, ""
        best: tuple[int, str] | None = None  # (where the match starts, the stop)
        for position in range(start, len(text)):
            char = text[position]
            for automaton in self._automata:
                if automaton.step(char):
                    candidate = (position + 1 - len(automaton.stop), automaton.stop)
                    best = candidate if best is None else min(best, candidate)
            if best is not None:
                break
        if best is not None:
            at, self.matched = best
            return text[:at]
        keep = max(automaton.state for automaton in self._automata)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def completes_in(self, text: str) -> bool:
        """Whether a stop string would complete in `text` fed now, the matcher left as it was: text that is not the
        answer's yet (a header the parser may still read as the answer) is checked without being shown or held."""
        if self.matched is not None:
            return False
        states = [automaton.state for automaton in self._automata]
        try:
            return any(automaton.step(char) for char in text for automaton in self._automata)
        finally:
            for automaton, state in zip(self._automata, states):
                automaton.state = state

    def flush(self) -> str:
        """What was held back, now that the text ended without completing a stop string."""
        held, self._held = self._held, ""
        for automaton in self._automata:  # what was held is shown now: no stop may start in it any more
            automaton.state = 0
        return "" if self.matched is not None else held

    def filter(self, events: Iterable[Event]) -> list[Event]:
        """Parser events with the answer text cut and held back; after a match only closing events pass. The answer's
        messages are one text to the client (`service.JoinedMessages`), so a message's end neither shows what is held
        nor restarts the matching: reset there, a stop spanning the join of a preamble and the answer was returned."""
        out: list[Event] = []
        for event in events:
            if isinstance(event, ContentDelta):
                text = self.feed(event.text)
                if text:
                    out.append(ContentDelta(text, event.channel))
                continue
            if isinstance(event, Finished):
                if held := self.flush():
                    out.append(ContentDelta(held))
                out.append(Finished("stop") if self.matched is not None else event)
            elif isinstance(event, MessageEnd) or self.matched is None:
                out.append(event)
        return out
