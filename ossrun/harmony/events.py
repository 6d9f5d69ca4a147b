"""What the streaming parser emits: API-level events, independent of any wire format.

The Chat Completions, Responses and Workers AI `/ai/run` streams are all built from these,
so each surface only decides how to spell them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """More chain-of-thought text (the `analysis` channel)."""

    text: str


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """More user-visible answer text (`final`, or a `commentary` preamble without a recipient): `channel` says which
    (Responses labels a preamble's message `phase: "commentary"`, so that it is sent back as one)."""

    text: str
    channel: str = "final"


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """The model began calling function `name`; `index` counts calls within this completion."""

    index: int
    call_id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArgumentsDelta:
    """More of the JSON arguments of tool call `index`."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """A harmony message closed; surfaces use it to close their output items."""

    channel: str
    recipient: str | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """Generation is over: `stop`, `tool_calls`, `length` (or whatever the caller passed to finish)."""

    reason: str


Event = Union[ReasoningDelta, ContentDelta, ToolCallStart, ToolCallArgumentsDelta, MessageEnd, Finished]


@dataclass(slots=True)
class ParsedToolCall:
    """One complete tool call of a non-streamed completion; `arguments` is the model's JSON text."""

    call_id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class ParsedCompletion:
    """A whole completion folded from the events: what a non-streaming response needs."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    anomalies: list[str] = field(default_factory=list)
