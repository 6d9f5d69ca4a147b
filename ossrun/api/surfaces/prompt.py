"""Workers AI's Prompt-shape answer (`/ai/run` with `prompt`): `{response, usage, tool_calls?, logprobs?}`, streamed as
`{"response": text}` frames (with `logprobs: true`, each with its tokens' `logprobs`) and a last frame with the usage
and the tool calls."""

from __future__ import annotations

from typing import Any

from ossrun import harmony
from ossrun.api import results
from ossrun.api.service import Outcome, usage
from ossrun.api.surfaces.frames import error_frames, frame, nothing_to_keep


class PromptSurface:
    failed = staticmethod(error_frames)
    keep = staticmethod(nothing_to_keep)

    def __init__(self, outcome: Outcome, prices, json_mode: bool, with_logprobs: bool = False):
        self.outcome, self.prices, self.json_mode, self.with_logprobs = outcome, prices, json_mode, with_logprobs
        self._sent_logprobs = 0  # entries of outcome.logprobs already sent: each text frame carries its tokens'

    def opening(self) -> list[bytes]:
        return []

    def event(self, event: harmony.Event) -> list[bytes]:
        if not isinstance(event, harmony.ContentDelta):
            return []
        data: dict[str, Any] = {"response": event.text}
        if self.with_logprobs:
            data["logprobs"] = results.choice_logprobs(self.outcome.logprobs[self._sent_logprobs:])
            self._sent_logprobs = len(self.outcome.logprobs)
        return [frame(data)]

    def closing(self) -> list[bytes]:
        last: dict[str, Any] = {"response": "", "finish_reason": self.outcome.finish_reason,
                                "usage": usage(self.outcome, self.prices)}
        if self.outcome.tool_calls:
            last["tool_calls"] = results.prompt_tool_calls(self.outcome)
        return [frame(last)]

    def result(self) -> dict[str, Any]:
        return results.prompt_result(self.outcome, self.prices, self.json_mode, self.with_logprobs)
