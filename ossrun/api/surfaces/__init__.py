"""Each API surface as one object: how a request's parsed events are spelled as a stream, and as one result.

A surface is made per request (per choice) around an `Outcome`. `drive` is the one loop both modes
share: engine steps → the outcome's counters and parsed events → the surface's frames. A stream
sends those frames; a sync request runs the very same loop, drops the frames, and answers
`surface.result()`. Both are built from the same outcome and the same event sequence, so they
cannot drift (the Responses stream's final object *is* the sync result).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Protocol

from ossrun import harmony
from ossrun.api.errors import NO_RETRY, TIMEOUT, ApiError
from ossrun.api.metering import Tally
from ossrun.api.service import Outcome, Plan, Service
from ossrun.api.surfaces.frames import DONE, stream_error
from ossrun.engine.client import Priority

log = logging.getLogger(__name__)


class Surface(Protocol):
    outcome: Outcome

    def opening(self) -> list[bytes]:
        """Frames before the first token (a stream's role chunk, `response.created`)."""

    def event(self, event: harmony.Event) -> list[bytes]:
        """Frames for one parsed event (already folded into `outcome`)."""

    def closing(self) -> list[bytes]:
        """Frames after the last event: the finish chunk, usage, the final object (not `[DONE]`)."""

    def result(self) -> dict[str, Any]:
        """The whole answer, as a sync request returns it."""

    def failed(self, error: ApiError, openai_shape: bool) -> list[bytes]:
        """Frames that end a stream whose generation failed (`openai_shape`: a /v1 route), before `[DONE]`."""

    async def keep(self) -> None:
        """The writes the end `closing` or `failed` built needs before its frames go out (the Responses store)."""


async def drive(service: Service, plan: Plan, surface: Surface, tally: Tally | None = None) -> AsyncIterator[bytes]:
    """The request's frames, from the engine's first step to the closing ones; metered however it
    ends (a client that leaves mid-stream has still had its tokens generated). `tally`: the request's
    metering when this is one of its choices (by default the request is this one choice)."""
    outcome = surface.outcome
    tally = tally or service.metering.tally(1, lambda: outcome, batch=plan.priority is Priority.BATCH)
    try:
        for frame in surface.opening():
            yield frame
        async with aclosing(service.run(plan)) as steps:  # closed with this generator: it aborts the engine request
            async for step in steps:
                service.account(outcome, step)
                for event in step.events:
                    outcome.add(event)
                    for frame in surface.event(event):
                        yield frame
        closing = surface.closing()
        interrupted = await _kept(surface)
        for frame in closing:
            yield frame
        if interrupted is not None:
            raise interrupted
    finally:
        tally.ended()


async def _kept(surface: Surface) -> asyncio.CancelledError | None:
    """`surface.keep()`. A cancellation that arrives meanwhile (raised once the write has ended: `Service.write`) is
    returned, for the caller to raise after the frames that say how the answer ended: a cancel too late to stop a
    background run leaves its listeners the terminal event of the end its store holds."""
    try:
        await surface.keep()
    except asyncio.CancelledError as cancelled:
        return cancelled
    return None


async def stream(service: Service, plan: Plan, surface: Surface, tally: Tally | None = None,
                 openai_shape: bool = False) -> AsyncIterator[bytes]:
    """Server-sent events: the frames, the surface's failure frames if generation fails, then `data: [DONE]`."""
    try:
        async with aclosing(drive(service, plan, surface, tally)) as frames:
            async for frame in frames:
                yield frame
    except Exception as exc:
        failing = surface.failed(stream_error(exc), openai_shape)
        interrupted = await _kept(surface)
        for frame in failing:
            yield frame
        if interrupted is not None:
            raise interrupted from None
    yield DONE


async def complete(service: Service, plan: Plan, surface: Surface, tally: Tally | None = None) -> dict[str, Any]:
    """The sync answer: the same loop as the stream, within the request timeout (if it has one)."""
    try:
        async with asyncio.timeout(time_limit(service, plan)):
            async with aclosing(drive(service, plan, surface, tally)) as frames:
                async for _ in frames:
                    pass
    except TimeoutError:
        raise ApiError(*TIMEOUT, headers=NO_RETRY) from None
    return surface.result()


def time_limit(service: Service, plan: Plan) -> float | None:
    """`--request-timeout` bounds a request a client waits on. A batch item has no connection waiting, and the
    clock would also count the time it waits behind interactive work and its own batch (16 items share every step):
    its `max_tokens` bounds it, and a queued item is finished eventually, never cut at the interactive limit."""
    return None if plan.priority is Priority.BATCH else service.settings.request_timeout_s


def for_plan(service: Service, plan: Plan, model: str, include_usage: bool, usage_nulls: bool | None = None,
             response_id: str | None = None) -> Surface:
    """The surface a plan's shape answers in (`model`: the name the answer carries). `include_usage`: a stream ends
    with a usage chunk; `usage_nulls` (default: the same): every other chunk says `"usage": null`, as OpenAI's do
    for a client that sent `stream_options.include_usage`. `response_id`: a Responses answer's id (a new one if None)."""
    usage_nulls = include_usage if usage_nulls is None else usage_nulls
    from ossrun.api.surfaces.chat import ChatSurface
    from ossrun.api.surfaces.completion import CompletionSurface
    from ossrun.api.surfaces.prompt import PromptSurface
    from ossrun.api.surfaces.responses import ResponsesSurface

    outcome, prices, ask = Outcome(), service.metering.prices, plan.ask  # its prompt counts once the engine read it
    if plan.shape == "prompt":
        return PromptSurface(outcome, prices, plan.json_mode, ask.logprobs)
    if plan.shape == "messages":
        return ChatSurface(outcome, model, prices, ask.logprobs, include_usage, ask.legacy_functions, usage_nulls)
    if plan.shape == "completions":
        return CompletionSurface(outcome, model, prices, ask.logprobs, include_usage, ask.prompt if ask.echo else "", usage_nulls)

    async def remember(response: dict[str, Any], replacing: bool) -> None:
        """The answer exists and is metered: a store that fails costs only its later `previous_response_id`.
        `replacing`: a background run's ends replace its snapshot, and only that (one deleted meanwhile stays
        deleted). The surface says so, not the body: `/ai/run` serves `background: true` as a plain request (no
        snapshot), whose answer is stored as any other."""
        try:
            await service.keep_response(ask, response, replacing=replacing)
        except ApiError:  # the data directory refused the write: `Service.writing` logged the streak, once
            pass
        except Exception:  # a bug, not a full disk: its traceback
            log.exception("could not store response %s; it is answered but cannot be continued", response["id"])

    return ResponsesSurface(outcome, model, prices, ask.source, remember, ask.logprobs,
                            {"temperature": plan.params.temperature, "top_p": plan.params.top_p}, response_id)
