"""Legacy text completions (`/v1/completions`): a `text_completion` of every generated token's text (after the
prompt's, with `echo`), streamed as `text_completion` chunks, each with the logprobs of its own tokens."""

from __future__ import annotations

import time
from typing import Any

from ossrun import harmony
from ossrun.api import results
from ossrun.api.service import Outcome, usage
from ossrun.api.surfaces.frames import error_frames, frame, nothing_to_keep


class CompletionSurface:
    failed = staticmethod(error_frames)
    keep = staticmethod(nothing_to_keep)

    def __init__(self, outcome: Outcome, model: str, prices, with_logprobs: bool, include_usage: bool, echo: str = "", usage_nulls: bool = True):
        self.outcome, self.model, self.prices = outcome, model, prices
        self.with_logprobs, self.include_usage = with_logprobs, include_usage
        self.usage_nulls = include_usage and usage_nulls
        self.echo = echo  # the prompt's text, sent before the answer's (`echo: true`; never with logprobs)
        self.id, self.created = results.new_id("cmpl"), int(time.time())
        self._sent_logprobs, self._logprobs = 0, results.LegacyLogprobs()

    def _chunk(self, text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = self.outcome.stop_reason
        data = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": [choice]}
        if self.usage_nulls:
            data["usage"] = None  # as on chat: every chunk but the usage one says null
        return frame(data)

    def opening(self) -> list[bytes]:
        return [self._chunk(self.echo)] if self.echo else []

    def event(self, event: harmony.Event) -> list[bytes]:
        if not isinstance(event, harmony.ContentDelta):
            return []
        logprobs = None
        if self.with_logprobs:
            fresh = self.outcome.logprobs[self._sent_logprobs:]
            logprobs = self._logprobs.take(fresh)
            self._sent_logprobs = len(self.outcome.logprobs)
        return [self._chunk(event.text, logprobs=logprobs)]

    def closing(self) -> list[bytes]:
        frames = [self._chunk("", results.completion_finish(self.outcome))]
        if self.include_usage:
            frames.append(frame({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                                 "choices": [], "usage": usage(self.outcome, self.prices)}))
        return frames

    def result(self) -> dict[str, Any]:
        return results.text_completion(self.outcome, self.model, self.prices, self.with_logprobs, self.id, self.created, self.echo)
