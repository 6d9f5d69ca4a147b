"""The Responses API (`/v1/responses`, and `/ai/run` with `input`): a `response` object whose output items
(reasoning, message, function calls) are opened and closed as the parsed events come. The stream sends
each item's events; its final `response.completed` object is the sync result, built from the same items."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from ossrun import harmony
from ossrun.api import results
from ossrun.api.errors import ApiError
from ossrun.api.schemas import ResponsesInput
from ossrun.api.service import Outcome
from ossrun.api.surfaces.frames import frame, nothing_to_keep
from ossrun.harmony.shapes import seal_reasoning

ENCRYPTED_REASONING = "reasoning.encrypted_content"  # an `include` value: reasoning items carry it (shapes.seal_reasoning)
_DELTA = {"reasoning": "response.reasoning_text.delta", "message": "response.output_text.delta",
          "function_call": "response.function_call_arguments.delta"}


def summary_asked(request: ResponsesInput | None) -> bool:
    """`reasoning.summary` set (`auto`, `concise`, `detailed`). gpt-oss has no separate summariser, so the summary is
    the reasoning text itself, as one `summary_text` part (clients such as the AI SDK's `openai()` read reasoning only
    from the summary); the reasoning item's `content` holds the same text as without it."""
    return request is not None and request.reasoning is not None and request.reasoning.summary is not None


class ResponsesSurface:
    """`remember(response, replacing)` keeps the finished response for `previous_response_id` (both modes; `keep` awaits it before
    the terminal event goes out, so a client that read the end can retrieve and continue it); `with_logprobs`:
    the answer text's tokens are listed (`include: ["message.output_text.logprobs"]`) in its `output_text` part and
    in the deltas that show them, as the chat surface lists them; `sampling`: the temperature and top_p used, echoed.
    With `reasoning.summary` (`summary_asked`) a reasoning item also carries its text as its summary, streamed with
    OpenAI's summary events beside the `reasoning_text` ones."""

    def __init__(self, outcome: Outcome, model: str, prices, request: ResponsesInput | None,
                 remember: Callable[[dict[str, Any], bool], Awaitable[None]], with_logprobs: bool = False,
                 sampling: dict[str, float] | None = None, response_id: str | None = None):
        self.outcome, self.model, self.prices, self.request, self.remember = outcome, model, prices, request, remember
        self.with_logprobs, self.sampling = with_logprobs, sampling
        self.with_summary = summary_asked(request)
        self.id, self.created = response_id or results.new_id("resp"), int(time.time())
        self.completed_at: int | None = None  # when the final object was first built: every copy of it says the same
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.text = ""
        self.logprobs: list[dict[str, Any]] = []  # the open message's entries
        self._sent_logprobs = 0  # entries of outcome.logprobs already in a delta
        # A background run's snapshot was kept when it started (`shell`), so each way it ends is kept over it: failed
        # and cancelled too, or a poller would read `in_progress` for ever.
        self.keeps_every_end = False
        self.finished = False  # the final object is built and kept: a cancel arriving now changes nothing
        self._unkept: dict[str, Any] | None = None  # the end `closing` or `failed` built, for `keep`

    # -- the surface --------------------------------------------------------------------------------
    def opening(self) -> list[bytes]:
        shell = self.shell()
        return [self._event("response.created", response=shell), self._event("response.in_progress", response=shell)]

    def shell(self) -> dict[str, Any]:
        """The response as it starts: `in_progress`, no output (the opening events' object, a background run's snapshot)."""
        return results.response_object(None, self.model, self.prices, self.id, self.created, request=self.request,
                                       sampling=self.sampling)

    def event(self, event: harmony.Event) -> list[bytes]:
        kind = self.current["type"] if self.current else None
        frames: list[bytes] = []
        if isinstance(event, harmony.ReasoningDelta):
            if kind != "reasoning":
                frames += self._open({"type": "reasoning", "id": results.new_id("rs"), "summary": [], "content": []})
            frames += self._delta(event.text)
        elif isinstance(event, harmony.ContentDelta):
            if kind != "message":
                frames += self._open(_message_item(event.channel))
            frames += self._delta(event.text)
        elif isinstance(event, harmony.ToolCallStart):
            namespace, name = self.request.called(event.name) if self.request else (None, event.name)
            frames += self._open(results.function_call_item(event.call_id, name, "", status="in_progress", namespace=namespace))
        elif isinstance(event, harmony.ToolCallArgumentsDelta) and self.current is not None:
            frames += self._delta(event.text)
        elif isinstance(event, harmony.MessageEnd):  # on the last step of a `length` finish: cut off
            frames += self._close(cut=self._cut)
        return frames

    def closing(self) -> list[bytes]:
        frames = self._close(cut=self._cut)
        # A finished response has an answer, even if empty; one cut inside its reasoning has none, as on OpenAI (an
        # empty message would be an empty final turn when the output is sent back).
        if not self._cut and not any(item["type"] in ("message", "function_call") for item in self.output):
            frames += self._open(_message_item("final"))
            frames += self._close(cut=self._cut)
        final = self._unkept = self.result()
        self.finished = True
        return frames + [self._event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)]

    def failed(self, error: ApiError, openai_shape: bool) -> list[bytes]:
        """Generation failed mid-way: `response.failed`, the Responses stream's own terminal event (an event of its
        kind and sequence, as clients dispatch on `type`), with the output so far and OpenAI's `error` object. Not
        kept for `previous_response_id`: a failed response is no conversation to continue (a background one is kept,
        to end its snapshot, and `ResponseStore.continue_from` refuses it). The item generation was in
        holds what it streamed, `incomplete` as an item `max_output_tokens` cut (nothing will complete it); its done
        events are not sent, since it did not end."""
        self._cut_open_item()
        response = {**self.result(), "status": "failed", "completed_at": None,
                    "error": {"code": "server_error", "message": error.message}, "incomplete_details": None}
        if self.keeps_every_end:
            self._unkept = response
        return [self._event("response.failed", response=response)]

    async def keep(self) -> None:
        """Keep the end `closing` or `failed` built (the caller sends its frames after this)."""
        response, self._unkept = self._unkept, None
        if response is not None:
            await self.remember(response, self.keeps_every_end)

    async def cancelled(self) -> None:
        """`POST /v1/responses/{id}/cancel` stopped a background run: it is kept `cancelled` with the output so far
        (the open item cut off, as `failed` leaves it). Its stream gets no event for it (OpenAI's Responses events
        have none): it ends. A run whose final object was already built and kept is left as it ended."""
        if self.finished:
            return
        self._cut_open_item()
        self.finished = True
        await self.remember({**self.result(), "status": "cancelled", "completed_at": None, "incomplete_details": None},
                            self.keeps_every_end)

    def _cut_open_item(self) -> None:
        """The item generation was in holds what it streamed, `incomplete` (nothing will complete it); no done events."""
        if self.current is not None:
            self._fill(cut=True)
            self.current = None

    def result(self) -> dict[str, Any]:
        self.completed_at = self.completed_at or int(time.time())
        return results.response_object(self.outcome, self.model, self.prices, self.id, self.created, output=self.output,
                                       request=self.request, sampling=self.sampling, completed_at=self.completed_at)

    # -- output items -------------------------------------------------------------------------------
    @property
    def _cut(self) -> bool:
        return self.outcome.finish_reason == "length"

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return frame(data, event=kind)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.current["id"], "output_index": len(self.output) - 1}

    def _open(self, item: dict[str, Any]) -> list[bytes]:
        frames = self._close()
        self.current, self.text, self.logprobs = item, "", []
        self.output.append(item)
        frames.append(self._event("response.output_item.added", output_index=len(self.output) - 1, item=item))
        if item["type"] == "message":
            frames.append(self._event("response.content_part.added", **self._where(), content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        elif item["type"] == "reasoning":  # its deltas name content part 0, so the part is added first (as OpenAI's server)
            frames.append(self._event("response.content_part.added", **self._where(), content_index=0,
                                      part={"type": "reasoning_text", "text": ""}))
            if self.with_summary:  # OpenAI's summary part, opened as its server opens one
                frames.append(self._event("response.reasoning_summary_part.added", **self._where(), summary_index=0,
                                          part={"type": "summary_text", "text": ""}))
        return frames

    def _delta(self, text: str) -> list[bytes]:
        """The open item's delta event; a reasoning delta is its summary's delta too when a summary was asked for."""
        self.text += text
        kind = self.current["type"]
        extra = {} if kind == "function_call" else {"content_index": 0}
        if kind == "message":
            extra["logprobs"] = self._new_logprobs()  # OpenAI always sends it on answer text (empty unless asked for)
        frames = [self._event(_DELTA[kind], **self._where(), **extra, delta=text)]
        if kind == "reasoning" and self.with_summary:
            frames.append(self._event("response.reasoning_summary_text.delta", **self._where(), summary_index=0, delta=text))
        return frames

    def _new_logprobs(self) -> list[dict[str, Any]]:
        """The entries not yet sent: those of the tokens whose text is now shown (the service lists exactly those,
        in the step that shows their text, before its events reach the surface); [] unless asked for."""
        if not self.with_logprobs:
            return []
        new = self.outcome.logprobs[self._sent_logprobs:]
        self._sent_logprobs = len(self.outcome.logprobs)
        self.logprobs += new
        return new

    def _fill(self, cut: bool) -> dict[str, Any] | None:
        """Put what the open item gathered into it: its text as its part (reasoning, message) or its arguments (a
        call), and a message's or call's status (`cut`: `incomplete`). Returns the part (None for a call)."""
        item = self.current
        if item["type"] == "reasoning":  # OpenAI's reasoning items need no status; ossrun's never carry one
            part = {"type": "reasoning_text", "text": self.text}
            item["content"] = [part]
            if self.with_summary:
                item["summary"] = [{"type": "summary_text", "text": self.text}]
            if self.request is not None and ENCRYPTED_REASONING in (self.request.include or ()):
                item["encrypted_content"] = seal_reasoning(self.text)
            return part
        item["status"] = "incomplete" if cut else "completed"
        if item["type"] == "message":
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": self.logprobs}
            item["content"] = [part]
            return part
        item["arguments"] = self.text
        return None

    def _close(self, cut: bool = False) -> list[bytes]:
        """End the open item and send its done events; `cut`: `max_output_tokens` ended it, so it is `incomplete`."""
        if self.current is None:
            return []
        item, part = self.current, self._fill(cut)
        where = self._where()
        if item["type"] == "reasoning":
            frames = [self._event("response.reasoning_text.done", **where, content_index=0, text=self.text)]
        elif item["type"] == "message":
            frames = [self._event("response.output_text.done", **where, content_index=0, text=self.text, logprobs=self.logprobs)]
        else:
            frames = [self._event("response.function_call_arguments.done", **where, name=item["name"], arguments=self.text)]
        if part is not None:
            frames.append(self._event("response.content_part.done", **where, content_index=0, part=part))
        if item["type"] == "reasoning" and self.with_summary:
            frames += self._summary_done(cut)
        frames.append(self._event("response.output_item.done", output_index=len(self.output) - 1, item=item))
        self.current = None
        return frames

    def _summary_done(self, cut: bool) -> list[bytes]:
        """OpenAI's closing events of the reasoning's summary part (filled by `_fill`); the part is `incomplete` when
        `max_output_tokens` cut the reasoning, as OpenAI marks a part whose generation was interrupted."""
        where, (part,) = self._where(), self.current["summary"]
        return [self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=self.text),
                self._event("response.reasoning_summary_part.done", **where, summary_index=0, part=part,
                            **({"status": "incomplete"} if cut else {}))]


# The event a stream ends with, by the response's status. `cancelled` has none among OpenAI's Responses events (its
# stream just ends), nor has a run still `in_progress`.
_TERMINAL = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}


def replay(stored: dict[str, Any], after: int | None = None) -> list[bytes]:
    """A stored response as the events its live stream sends (`GET /v1/responses/{id}?stream=true`), event i with
    sequence_number i: the opening events, each output item's events with its whole text as one delta, then the event
    of its status. The same writers as the live stream's, so the two cannot drift. `after`: only the events numbered
    above it, but the terminal event always, numbered after `after` when that is past the replay's numbering: a
    cursor from the live stream (one delta per token) can be, once its frames are gone (`api/background.py`), and the
    client must still learn the end and get the final object."""
    return _Replay(stored).frames(after)


class _Replay(ResponsesSurface):
    """The surface driven by a stored response's items instead of the engine's events: each item opened as the live
    stream opens it, closed as it was kept (its logprobs, summary and encrypted reasoning included)."""

    def __init__(self, stored: dict[str, Any]):
        super().__init__(Outcome(), stored["model"], None, None, remember=lambda _: nothing_to_keep())
        self.id, self.created, self.stored = stored["id"], stored["created_at"], stored
        self.kept: dict[str, Any] = {}  # the stored item being replayed

    def shell(self) -> dict[str, Any]:
        return {**self.stored, "status": "in_progress", "completed_at": None, "error": None, "incomplete_details": None, "output": [],
                "output_text": "", "usage": None}

    def frames(self, after: int | None) -> list[bytes]:
        frames = self.opening()
        items = self.stored.get("output") or []
        for index, item in enumerate(items):
            self.kept, self.with_summary = item, bool(item.get("summary"))
            frames += self._open(_as_opened(item))
            text = item.get("arguments", "") if item["type"] == "function_call" else _part_of(item).get("text", "")
            if text:
                frames += self._delta(text)
            # Only the last item can have been cut, by max_output_tokens (the response is `incomplete`), a failure or a cancel.
            cut = index == len(items) - 1 and (self.stored["status"] == "incomplete" or item.get("status") == "incomplete")
            frames += self._close(cut=cut)
        start = 0 if after is None else after + 1
        kind = _TERMINAL.get(self.stored["status"])
        if kind is None:
            return frames[start:]
        self.sequence = max(self.sequence, start)
        return frames[start:] + [self._event(kind, response=self.stored)]

    def _new_logprobs(self) -> list[dict[str, Any]]:
        self.logprobs = list(_part_of(self.kept).get("logprobs") or [])
        return self.logprobs

    def _fill(self, cut: bool) -> dict[str, Any] | None:
        self.current.clear()
        self.current.update(self.kept)
        return None if self.kept["type"] == "function_call" else (_part_of(self.kept) or None)


def _part_of(item: dict[str, Any]) -> dict[str, Any]:
    """A reasoning or message item's one content part ({} if it has none)."""
    content = item.get("content") or []
    return content[0] if content and isinstance(content[0], dict) else {}


def _as_opened(item: dict[str, Any]) -> dict[str, Any]:
    """A stored output item as the live stream's `output_item.added` showed it, before anything was generated."""
    if item["type"] == "function_call":
        return results.function_call_item(item["call_id"], item["name"], "", item["id"], status="in_progress",
                                          namespace=item.get("namespace"))
    if item["type"] == "message":  # one stored before messages had a phase has none
        phase = {"phase": item["phase"]} if "phase" in item else {}
        return {"type": "message", "id": item["id"], "role": "assistant", "status": "in_progress", "content": [], **phase}
    return {"type": "reasoning", "id": item["id"], "summary": [], "content": []}


def _message_item(channel: str) -> dict[str, Any]:
    """A new assistant message item, labelled with OpenAI's `phase`: a preamble (harmony's commentary channel, before
    the turn's tool calls) is `commentary`, an answer `final_answer`. Sent back with the phase, the message is rendered
    on its channel again (`harmony.inputs`); OpenAI asks clients to preserve and resend it."""
    return {"type": "message", "id": results.new_id("msg"), "role": "assistant", "status": "in_progress", "content": [],
            "phase": "commentary" if channel == "commentary" else "final_answer"}
