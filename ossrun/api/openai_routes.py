"""The OpenAI surface, bare (`/v1/...`) and under the account prefix (`/client/v4/accounts/{id}/ai/v1/...`)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Query, Request

from ossrun.api import ask as asks
from ossrun.api import choices, results, schemas, surfaces
from ossrun.api.disconnect import EventStream, unless_client_leaves
from ossrun.api.service import Service, usage
from ossrun.api.errors import ApiError, bad_input
from ossrun.api.workers_ai import json_body, service_of


async def _answer(request: Request, service: Service, ask: asks.Ask | list[asks.Ask], model: str):
    """Plan (one plan per choice of `n`, for each prompt of a `/v1/completions` batch), then stream or answer: each
    choice through its surface, choice i of prompt p at index p * n + i."""
    batch = ask if isinstance(ask, list) else [ask]
    ask = batch[0]
    planned = await asyncio.gather(*(service.plan_off_loop(one, openai=True) for one in batch))
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
    if ask.stream:
        streams = [surfaces.stream(service, plan, surface, tally, openai_shape=True) for plan, surface in zip(plans, made)]
        return EventStream(streams[0] if len(streams) == 1 else choices.merged_stream(streams, total_usage))
    answers = await unless_client_leaves(request, asyncio.gather(*(surfaces.complete(service, p, s, tally) for p, s in zip(plans, made))))
    if len(answers) == 1:
        return answers[0]
    return choices.merge_results(answers, total_usage())


async def chat_completions(request: Request):
    service: Service = service_of(request)
    body = schemas.parse(schemas.ChatCompletionRequest, await json_body(request))
    service.check_model(body.model)
    return await _answer(request, service, asks.from_messages(body), body.model)


async def responses(request: Request):
    service: Service = service_of(request)
    body = schemas.parse(schemas.ResponsesRequest, await json_body(request))
    service.check_model(body.model)
    body = service.responses.expand(body)  # item references resolved, previous_response_id prepended
    return await _answer(request, service, asks.from_responses(body), body.model)


async def completions(request: Request):
    service: Service = service_of(request)
    body = schemas.parse(schemas.CompletionRequest, await json_body(request))
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


def _not_stored(response_id: str) -> ApiError:
    return ApiError(404, 5006, f"No stored response {response_id!r} (unknown, expired, deleted, or created with store: false)",
                    "response_id")


async def stored_response(response_id: str, request: Request):
    """`client.responses.retrieve(id)`: a finished response kept for `previous_response_id`."""
    response = service_of(request).responses.get(response_id)
    if response is None:
        raise _not_stored(response_id)
    return results.with_current_keys(response)


async def delete_response(response_id: str, request: Request):
    """`client.responses.delete(id)`: the stored response is gone (no retrieve, no `previous_response_id`)."""
    if not service_of(request).responses.delete(response_id):
        raise _not_stored(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


async def input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                      order: Literal["asc", "desc"] = "desc", after: str | None = None):
    """`client.responses.input_items.list(id)`: the items the response was generated from, with ids, as OpenAI's
    cursor page (newest first unless `order=asc`; `after`: the id the previous page ended at)."""
    items = service_of(request).responses.input_items(response_id)
    if items is None:
        raise _not_stored(response_id)
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


def make_router(prefix: str, include_in_schema: bool) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["OpenAI"], include_in_schema=include_in_schema)
    router.add_api_route("/chat/completions", chat_completions, methods=["POST"], summary="Chat completions",
                         openapi_extra=schemas.body_schema(schemas.ChatCompletionRequest))
    router.add_api_route("/responses", responses, methods=["POST"], summary="Responses",
                         openapi_extra=schemas.body_schema(schemas.ResponsesRequest))
    router.add_api_route("/completions", completions, methods=["POST"], summary="Text completions",
                         openapi_extra=schemas.body_schema(schemas.CompletionRequest))
    router.add_api_route("/models", models, methods=["GET"], summary="Models")
    router.add_api_route("/models/{model_id:path}", model, methods=["GET"], summary="One model")
    router.add_api_route("/responses/{response_id}", stored_response, methods=["GET"], summary="A stored response")
    router.add_api_route("/responses/{response_id}", delete_response, methods=["DELETE"], summary="Delete a stored response")
    router.add_api_route("/responses/{response_id}/input_items", input_items, methods=["GET"], summary="A stored response's input items")
    return router


bare = make_router("/v1", include_in_schema=True)
prefixed = make_router("/client/v4/accounts/{account_id}/ai/v1", include_in_schema=True)
