"""The OpenAI surface, bare (`/v1/...`) and under the account prefix (`/client/v4/accounts/{id}/ai/v1/...`)."""

from __future__ import annotations

import asyncio
import uuid
from functools import partial
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from starlette.convertors import StringConvertor, register_url_convertor

from ossrun.api import ask as asks
from ossrun.api import choices, results, schemas, surfaces
from ossrun.api.access import client_address
from ossrun.api.background import BackgroundRun
from ossrun.api.disconnect import EventStream, unless_client_leaves
from ossrun.api.metering import Tally
from ossrun.api.service import Plan, Service, usage
from ossrun.api.errors import ApiError, bad_input
from ossrun.api.surfaces.frames import DONE
from ossrun.api.surfaces.responses import ResponsesSurface, replay
from ossrun.api.workers_ai import expanded, json_body, reject_if_busy, service_of


async def _answer(request: Request, service: Service, ask: asks.Ask | list[asks.Ask], model: str):
    """Plan (one plan per choice of `n`, for each prompt of a `/v1/completions` batch), then stream or answer: each
    choice through its surface, choice i of prompt p at index p * n + i."""
    batch = ask if isinstance(ask, list) else [ask]
    ask = batch[0]
    reject_if_busy(service, ask)
    client = client_address(request)  # the engine shares itself between clients, then between a client's requests
    planned = await asyncio.gather(*(service.plan_off_loop(one, openai=True, client=client) for one in batch))
    plans = [plan for first in planned for plan in service.choice_plans(first)]
    group = uuid.uuid4().hex  # one group in the engine: its slots are shared fairly between requests, not choices
    for plan in plans:
        plan.group = group
    made = [surfaces.for_plan(service, plan, model, ask.include_usage) for plan in plans]

    def total():  # streamed and sync alike: each prompt once, every choice's completion tokens
        outcomes = [s.outcome for s in made]
        return choices.combined([outcomes[at:at + ask.n] for at in range(0, len(outcomes), ask.n)])

    def total_usage() -> dict:
        return usage(total(), service.metering.prices)

    tally = service.metering.tally(len(made), total)  # /metrics counts the request as its usage does, once
    # Responses' background mode (n is 1 there): the run goes on whoever listens. Everything that refuses the request
    # (validation, planning: a prompt past the window, a schema that does not compile) was raised above, as the HTTP
    # error, before anything is queued or stored.
    if ask.background:
        run = await _detached(service, plans[0], made[0], tally)
        if ask.stream:
            return EventStream(run.follow(), service.settings.sse_keepalive_s)
        # Without a stream the client gets the snapshot at once and polls `GET /v1/responses/{id}` (OpenAI's way: a
        # client timeout shorter than the generation would otherwise cancel it and leave no id to poll). Its status is
        # OpenAI's for a just-created background response, `queued`: the run's task is scheduled, not yet started. The
        # stored snapshot stays `in_progress` (what a retrieve answers from the run's start on): the store's rules key on
        # it (`previous_response_id` refused while it runs, a restart failing one left running, the replay's shell).
        return {**made[0].shell(), "status": "queued"}
    if ask.stream:
        streams = [surfaces.stream(service, plan, surface, tally, openai_shape=True) for plan, surface in zip(plans, made)]
        return EventStream(streams[0] if len(streams) == 1 else choices.merged_stream(streams, total_usage),
                           service.settings.sse_keepalive_s)
    answers = await unless_client_leaves(request, asyncio.gather(*(surfaces.complete(service, p, s, tally) for p, s in zip(plans, made))))
    if len(answers) == 1:
        return answers[0]
    return choices.merge_results(answers, total_usage())


async def _detached(service: Service, plan: Plan, surface: ResponsesSurface, tally: Tally) -> BackgroundRun:
    """A background run (streamed or not): its `in_progress` snapshot kept (retrieve answers it while it runs), then
    generated as a stream by a run of its own, so a listener that leaves (the creating request included) stops only its
    own stream; a sync create is no listener at all. A snapshot the data directory refuses is the 503 of
    `Service.writing`, before anything runs: the store is where its result would be read, so a run nobody can
    retrieve would be generated for nothing (a sync answer is still sent without its store; this one is not)."""
    surface.keeps_every_end = True
    await service.keep_response(plan.ask, surface.shell())
    frames = surfaces.stream(service, plan, surface, tally, openai_shape=True)
    return service.background.start(surface.id, frames, on_cancel=surface.cancelled)


async def chat_completions(request: Request):
    service: Service = service_of(request)
    body = await json_body(request, partial(schemas.parse, schemas.ChatCompletionRequest))
    service.check_model(body.model)
    return await _answer(request, service, asks.from_messages(body), body.model)


async def responses(request: Request):
    service: Service = service_of(request)
    body = await json_body(request, partial(schemas.parse, schemas.ResponsesRequest))
    service.check_model(body.model)
    body = await expanded(service, body)  # item references resolved, previous_response_id prepended
    return await _answer(request, service, asks.from_responses(body), body.model)


async def completions(request: Request):
    service: Service = service_of(request)
    body = await json_body(request, partial(schemas.parse, schemas.CompletionRequest))
    service.check_model(body.model)
    return await _answer(request, service, asks.from_completion(body), body.model)


# gpt-oss's release (2025-08-05, UTC) as a Unix time: a model's `created` is a fact about it, the same on every call.
RELEASED = 1754352000


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": RELEASED, "owned_by": "openai"}


async def models(request: Request):
    service: Service = service_of(request)
    return {"object": "list", "data": [_model_card(name) for name in service.model_names]}


async def model(model_id: str, request: Request):
    """`client.models.retrieve(name)`."""
    if model_id not in service_of(request).model_names:
        raise ApiError(404, 5007, f"No such model {model_id}", "model")
    return _model_card(model_id)


def _not_stored(service: Service, response_id: str) -> ApiError:
    """The 404 of an id the store does not hold; one answered while the data directory refused to store it says so."""
    if service.responses.unkept(response_id):
        return ApiError(404, 5006, f"Response {response_id!r} was answered while the data directory refused writes (a full "
                                   "disk?), so it was not stored", "response_id")
    return ApiError(404, 5006, f"No stored response {response_id!r} (unknown, expired, deleted, or created with store: false)",
                    "response_id")


async def stored_response(response_id: ResponseIdPath, request: Request, stream: bool = False,
                          starting_after: int | None = Query(None, ge=0)):
    """`client.responses.retrieve(id)`: a stored response (a background one `in_progress` while it runs). With
    `stream=true` (`retrieve(id, stream=True)`, `responses.stream(response_id=…)`) its events after `starting_after`:
    a background run's as they came and come (also for a while after it ended: `BackgroundRuns`), else replayed from
    the stored object (`replay`, which always ends with the terminal event)."""
    service = service_of(request)
    run = service.background.get(response_id) if stream else None
    if run is not None:
        return EventStream(run.follow(starting_after), service.settings.sse_keepalive_s)
    response = service.responses.get(response_id)
    if response is None:
        raise _not_stored(service, response_id)
    response = results.with_current_keys(response)
    if not stream:
        return response
    return EventStream(_replayed(replay(response, starting_after)), service.settings.sse_keepalive_s)


async def _replayed(frames: list[bytes]) -> AsyncIterator[bytes]:
    """A replay's events, then `[DONE]`."""
    for frame in frames:
        yield frame
    yield DONE


async def cancel_response(response_id: ResponseIdPath, request: Request):
    """`client.responses.cancel(id)`: a running background response stops (its engine request aborted) and is kept
    `cancelled` with its output so far; a finished one is returned as it is. Only background responses can be
    cancelled (OpenAI's rule): another is a 400."""
    service = service_of(request)
    run = service.background.get(response_id)
    if run is not None:
        await run.cancel()
    response = service.responses.get(response_id)
    if response is None:
        raise _not_stored(service, response_id)
    if response.get("background") is not True:
        raise bad_input(f"Error: response {response_id!r} was not created with background: true; only a background "
                        "response can be cancelled", "response_id")
    return results.with_current_keys(response)


async def input_tokens(request: Request):
    """`client.responses.input_tokens.count(...)`: the `usage.input_tokens` the same body would get from
    `POST /v1/responses` (rendered the same way, a previous response's conversation included), without generating.
    `model` may be left out, as OpenAI's endpoint allows: the served model counts. Only what the count reads is
    validated (`schemas.InputTokensRequest`)."""
    service: Service = service_of(request)
    body = await json_body(request, partial(schemas.parse, schemas.InputTokensRequest))
    service.check_model(body.model or service.model_names[0])
    ask = asks.from_responses(await expanded(service, body))
    return {"object": "response.input_tokens", "input_tokens": await asyncio.to_thread(service.count_prompt, ask)}


async def delete_response(response_id: ResponseIdPath, request: Request):
    """`client.responses.delete(id)`: the stored response is gone (no retrieve, no `previous_response_id`). A running
    background one is cancelled once it is deleted (its end then finds no snapshot to replace:
    `ResponseStore.remember`'s `replacing`), and its frames are forgotten with it; a delete the data directory refuses
    is the 503 of `Service.write`, with the run going on."""
    service = service_of(request)
    if not await service.write("the responses", service.responses.delete, response_id):
        raise _not_stored(service, response_id)
    run = service.background.get(response_id)
    if run is not None:
        await run.cancel()
        service.background.drop(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


async def input_items(response_id: ResponseIdPath, request: Request, limit: int = Query(20, ge=1, le=100),
                      order: Literal["asc", "desc"] = "desc", after: str | None = None):
    """`client.responses.input_items.list(id)`: the items the response was generated from, with ids, as OpenAI's
    cursor page (newest first unless `order=asc`; `after`: the id the previous page ended at)."""
    service = service_of(request)
    items = service.responses.input_items(response_id)
    if items is None:
        raise _not_stored(service, response_id)
    return cursor_page(items if order == "asc" else items[::-1], limit, after)


def cursor_page(items: list[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's list object: up to `limit` items following the one whose id is `after` (an unknown id is a 400)."""
    if after is not None:
        at = next((i for i, item in enumerate(items) if item["id"] == after), None)
        if at is None:
            raise bad_input(f"Error: at '/after': no item {after!r} in this list", "after")
        items = items[at + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


class ResponseId(StringConvertor):
    """A response id in a path: any segment but the names OpenAI gives other Responses endpoints (`input_tokens`,
    `compact`), so `POST /v1/responses/compact` is a 404 "No route", not a 405 offering a retrieve's GET and DELETE."""

    regex = r"(?!(?:input_tokens|compact)(?:/|$))[^/]+"


register_url_convertor("response_id", ResponseId())


class ModelId(StringConvertor):
    """A model id in a path: slashes inside (`@cf/openai/gpt-oss-20b`), none first or last, so `GET /v1/models/` and
    `/v1/models/{id}/`, a path one `/` off a route, are the 404 "No route" (7000) as every such path is, not a model
    named "" or "…/" (5007; hunt round 17 A-F7)."""

    regex = r"[^/](?:.*[^/])?"


register_url_convertor("model_id", ModelId())
# The same rule in the OpenAPI document, so that a client generated from it (or a fuzzer) knows that GET
# /responses/input_tokens is not a retrieve (it is the 405 the count route answers).
ResponseIdPath = Annotated[str, Path(description="A response's id",
                                     json_schema_extra={"pattern": r"^(?!(?:input_tokens|compact)$)[^/]+$"})]


def make_router(prefix: str, include_in_schema: bool) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["OpenAI"], include_in_schema=include_in_schema)
    router.add_api_route("/chat/completions", chat_completions, methods=["POST"], summary="Chat completions",
                         openapi_extra=schemas.body_schema(schemas.ChatCompletionRequest))
    router.add_api_route("/responses", responses, methods=["POST"], summary="Responses",
                         openapi_extra=schemas.body_schema(schemas.ResponsesRequest))
    router.add_api_route("/completions", completions, methods=["POST"], summary="Text completions",
                         openapi_extra=schemas.body_schema(schemas.CompletionRequest))
    router.add_api_route("/models", models, methods=["GET"], summary="Models")
    router.add_api_route("/models/{model_id:model_id}", model, methods=["GET"], summary="One model")
    router.add_api_route("/responses/input_tokens", input_tokens, methods=["POST"], summary="Count a Responses body's input tokens",
                         openapi_extra=schemas.body_schema(schemas.InputTokensRequest))
    router.add_api_route("/responses/{response_id:response_id}", stored_response, methods=["GET"], summary="A stored response")
    router.add_api_route("/responses/{response_id:response_id}", delete_response, methods=["DELETE"], summary="Delete a stored response")
    router.add_api_route("/responses/{response_id:response_id}/input_items", input_items, methods=["GET"],
                         summary="A stored response's input items")
    router.add_api_route("/responses/{response_id:response_id}/cancel", cancel_response, methods=["POST"],
                         summary="Cancel a background response")
    return router


bare = make_router("/v1", include_in_schema=True)
prefixed = make_router("/client/v4/accounts/{account_id}/ai/v1", include_in_schema=True)
