"""Workers AI's Prompt-shape answer (`/ai/run` with `prompt`): `{response, usage, tool_calls?}`, streamed as
`{"response": text}` frames and a last frame with the usage and the tool calls."""

from __future__ import annotations

from typing import Any

from ossrun import harmony
from ossrun.api import results
from ossrun.api.service import Outcome, usage
from ossrun.api.surfaces.frames import frame


class PromptSurface:
    def __init__(self, outcome: Outcome, prices, json_mode: bool):
        self.outcome, self.prices, self.json_mode = outcome, prices, json_mode

    def opening(self) -> list[bytes]:
        return []

    def event(self, event: harmony.Event) -> list[bytes]:
        return [frame({"response": event.text})] if isinstance(event, harmony.ContentDelta) else []

    def closing(self) -> list[bytes]:
        last: dict[str, Any] = {"response": "", "usage": usage(self.outcome, self.prices)}
        if self.outcome.tool_calls:
            last["tool_calls"] = results.prompt_tool_calls(self.outcome)
        return [frame(last)]

    def result(self) -> dict[str, Any]:
        return results.prompt_result(self.outcome, self.prices, self.json_mode)
