"""Stop strings, applied to the answer's text where it is decoded: cut at the first match, never shown.

The engine's own stop-string check sees every decoded byte (harmony headers included) and can only
end generation after the token that completed the match, so the match and whatever followed it in
that token would reach the client. Here the answer text (`ContentDelta`s) passes through a matcher
that holds back any tail that could still become a stop string, cuts the text at the first match and
reports which stop it was; the caller then ends the engine request.
"""

from __future__ import annotations

from collections.abc import Iterable

from ossrun.harmony import ContentDelta, Event, Finished, MessageEnd


class StopStrings:
    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        self.matched: str | None = None  # the stop string that ended the text, once one did
        self._held = ""  # a tail that is a prefix of some stop string: not yet safe to show

    def feed(self, text: str) -> str:
        """The part of `text` (after what was held back) that can be shown now."""
        if self.matched is not None:
            return ""
        text, self._held = self._held + text, ""
        found = [(text.find(stop), stop) for stop in self.stops if stop in text]
        if found:
            at, self.matched = min(found)
            return text[:at]
        keep = max((k for stop in self.stops for k in range(1, min(len(stop), len(text) + 1))
                    if text.endswith(stop[:k])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What was held back, now that the text ended without completing a stop string."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def filter(self, events: Iterable[Event]) -> list[Event]:
        """Parser events with the answer text cut and held back; after a match only closing events pass."""
        out: list[Event] = []
        for event in events:
            if isinstance(event, ContentDelta):
                text = self.feed(event.text)
                if text:
                    out.append(ContentDelta(text))
                continue
            if isinstance(event, (MessageEnd, Finished)):
                if held := self.flush():
                    out.append(ContentDelta(held))
                out.append(Finished("stop") if isinstance(event, Finished) and self.matched is not None else event)
            elif self.matched is None:
                out.append(event)
        return out
