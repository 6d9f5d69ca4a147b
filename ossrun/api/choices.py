"""`n > 1` on /v1/chat/completions and /v1/completions: n engine requests, one answer with n choices.

Each choice is its own request (own seed, own grammar state); a seeded request stays reproducible
because choice i's seed is derived from the request's seed and i (choice 0 keeps the seed itself, so
`n: 1` and the first of `n: 2` agree). Streams of the choices are interleaved as they come, each
frame's choice renumbered, with one usage chunk and one `[DONE]` at the end.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from ossrun.api.service import Outcome
from ossrun.api.surfaces.frames import DONE, frame

MAX_CHOICES = 16
_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive choices' seeds far apart


def derive_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: the request's own for choice 0, a fixed mix of both for the others."""
    if seed is None or index == 0:
        return seed
    return (seed + index * _GOLDEN) % (2**63 - 1) or 1


def combined(groups: list[list[Outcome]]) -> Outcome:
    """Usage of all choices, grouped by prompt (one group but for a `/v1/completions` batch): each prompt
    once, every choice's completion tokens."""
    outcomes, read = [o for group in groups for o in group], [_read(group) for group in groups]
    return Outcome(prompt_tokens=sum(o.prompt_tokens for o in read), cached_tokens=sum(o.cached_tokens for o in read),
                   cache_write_tokens=sum(o.cache_write_tokens for o in read),
                   completion_tokens=sum(o.completion_tokens for o in outcomes),
                   reasoning_tokens=sum(o.reasoning_tokens for o in outcomes))


def _read(group: list[Outcome]) -> Outcome:
    """The prompt's counts from a choice the engine read it for (`Service.account`), if one was."""
    return next((o for o in group if o.prompt_tokens), group[0])


def merge_results(results: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    """One answer from each choice's single-choice answer (the first one's id and metadata)."""
    merged = dict(results[0])
    merged["choices"] = [{**result["choices"][0], "index": i} for i, result in enumerate(results)]
    merged["usage"] = usage
    return merged


async def merged_stream(streams: list[AsyncGenerator[bytes, None]], total_usage: Callable[[], dict[str, Any]]) -> AsyncIterator[bytes]:
    """The choices' SSE streams as one: frames renumbered by choice and given the first stream's id;
    the streams' usage chunks are held back and one is sent with `total_usage()` (the sync answer's
    usage, once every choice has ended); a single `[DONE]` ends it. Leaving early cancels every
    choice (each closes its engine request)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[bytes, None]) -> None:
        try:
            async with aclosing(stream):  # however the pump ends, the choice's stream (and engine request) is closed
                async for sent in stream:
                    await queue.put((index, sent))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    chunk_id, usages, open_streams = None, [], len(tasks)
    try:
        while open_streams:
            index, sent = await queue.get()
            if sent is None:
                open_streams -= 1
                continue
            if not sent.startswith(b"data: {"):
                continue  # [DONE]: only once, at the very end
            data = json.loads(sent[len(b"data: "):])
            if "choices" not in data:  # an error frame
                yield sent
                continue
            chunk_id = chunk_id or data.get("id")
            data["id"] = chunk_id
            if not data["choices"] and data.get("usage"):
                usages.append(data)
                continue
            for choice in data["choices"]:
                choice["index"] = index
            yield frame(data)
        if usages:
            last = usages[0]
            last["usage"] = total_usage()
            yield frame(last)
        yield DONE
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
