"""The Workers AI surface: `/client/v4/accounts/{account_id}/ai/...` with the v4 envelope."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from functools import partial
from pathlib import Path
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from ossrun.api import ask as asks
from ossrun.api import results, schemas, surfaces
from ossrun.api.access import client_address
from ossrun.api.ask import Ask
from ossrun.api.body import parse_body
from ossrun.api.disconnect import EventStream, stoppable_thread, unless_client_leaves
from ossrun.api.errors import ApiError, bad_input, envelope, openai_error_object
from ossrun.api.service import Outcome, Plan, Service
from ossrun.batch.store import Batch, BatchItem, QueueFull
from ossrun.batch.worker import ItemOutcome
from ossrun.engine.client import Priority

T = TypeVar("T")
R = TypeVar("R", bound=schemas.ResponsesInput)

router = APIRouter(prefix="/client/v4/accounts/{account_id}/ai", tags=["Workers AI"])

def service_of(request: Request) -> Service:
    return request.app.state.service


async def json_body(request: Request, into: Callable[[Any], T] = lambda body: body) -> T:
    """The body read into its type by `into` (its JSON value by default); off the event loop when it is large."""
    return await parse_body(await request.body(), into)


async def expanded(service: Service, request: R) -> R:
    """A Responses request with its item references resolved and its `previous_response_id` conversation in front
    (`ResponseStore.expand`), on a worker thread whatever the body's size: each reference is a query and a parse of a
    stored item, and a body small enough to be parsed on the event loop still holds thousands of them (hunt round 17
    A-F9: references to one stored item stalled every request, /health included, for 57 s)."""
    return await asyncio.to_thread(service.responses.expand, request)


def parse_run(service: Service, body: Any) -> Ask:
    """An `/ai/run` body → its typed request (Prompt, Messages or Responses shape), parsed once (on a worker thread:
    a Responses body's references are resolved here)."""
    return ask_of(service, *schemas.classify(body))


def ask_of(service: Service, shape: str, model: Any) -> Ask:
    """The request of a body `schemas.classify` typed; a Responses one expanded (`ResponseStore.expand`: not on the
    event loop)."""
    if shape == "prompt":
        return asks.from_prompt(model)
    if shape == "messages":
        return asks.from_messages(model)
    model = service.responses.expand(model)  # item references resolved, previous_response_id prepended
    return asks.from_responses(model)


def reject_if_busy(service: Service, ask: Ask) -> None:
    """`options.rejectIfBusy` (every surface: the hosted docs give it for `/ai/run` and the OpenAI routes alike): a 429,
    code 3040, at once, rather than a wait in the queue."""
    if ask.reject_if_busy and service.is_busy():
        from ossrun.api.errors import BUSY

        raise ApiError(*BUSY)


def surface_of(service: Service, plan: Plan, response_id: str | None = None) -> surfaces.Surface:
    """The `/ai/run` surface a plan answers in (sync, streamed or as a batch item; `response_id`: see `for_plan`)."""
    # The usage chunk always ends an /ai/run stream; `"usage": null` on the others only for a client that asked for
    # OpenAI's convention (Cloudflare's LangChain package reads every chunk's `usage` as an object when the key is there).
    return surfaces.for_plan(service, plan, service.engine.info.served_name, include_usage=True, usage_nulls=plan.ask.include_usage,
                             response_id=response_id)


async def run_sync(service: Service, ask: Ask, client: str | None = None) -> dict[str, Any]:
    """The sync result of one `/ai/run` request from `client` (a batch item's is made the same way: `batch_executor`)."""
    plan = await service.plan_off_loop(ask, client=client)
    return await surfaces.complete(service, plan, surface_of(service, plan))


def stream_response(service: Service, plan: Plan) -> EventStream:
    return EventStream(surfaces.stream(service, plan, surface_of(service, plan)), service.settings.sse_keepalive_s)


@router.post("/run/{model:path}", summary="Run the model (Prompt, Messages, Responses, batch queue, batch poll)",
             openapi_extra=schemas.body_schema(schemas.PromptInput, schemas.MessagesInput, schemas.ResponsesInput,
                                               schemas.BatchInput, schemas.PollInput))
async def run(account_id: str, model: str, request: Request, queueRequest: bool = False):
    service = service_of(request)
    if not model:  # `…/ai/run/`: no model segment is no route, as `…/ai/run` is
        raise ApiError(404, 7000, f"No route for {request.url.path}")
    service.check_model(model)
    body, (shape, typed) = await json_body(request, lambda body: (body, _typed(body)))
    if shape == "poll":  # the hosted docs poll on either URL
        return await _poll(service, body)
    if shape == "batch":
        return await _queue(service, model, body, request)
    ask = await asyncio.to_thread(ask_of, service, shape, typed) if shape == "responses" else ask_of(service, shape, typed)
    reject_if_busy(service, ask)
    client = client_address(request)  # the engine shares itself between clients, then between a client's requests
    if ask.stream and reads_event_streams(request):
        return stream_response(service, await service.plan_off_loop(ask, client=client))
    return envelope(await unless_client_leaves(request, run_sync(service, dataclasses.replace(ask, stream=False), client)))


# What a client that reads server-sent events accepts (parameters such as q= aside).
_EVENT_STREAM_TYPES = frozenset({"text/event-stream", "text/*", "*/*"})


def reads_event_streams(request: Request) -> bool:
    """Whether the client can read a `text/event-stream` answer: it sent no `Accept`, or one that admits it. Cloudflare's
    SDKs send `Accept: application/json` on every call, and the hosted API answers their `stream: true` with the JSON
    envelope, which they parse; ossrun's stream made `client.ai.run(..., stream=True)` raise (Python) or return
    undefined (Node). curl, fetch, httpx and the Vercel provider send `*/*` or nothing, and get the stream."""
    accept = request.headers.get("accept")
    if not accept:
        return True
    return any(part.split(";")[0].strip().lower() in _EVENT_STREAM_TYPES for part in accept.split(","))


def _typed(body: Any) -> tuple[str, Any]:
    """The body's branch (`schemas.RUN_KEYS`: its one key decides, as the document's oneOf does) and, for a shape that
    runs, its typed body (None for a poll or a batch). A `requests` batch is queued with or without ?queueRequest=true
    (the hosted API wants it, and that URL also runs a single request rather than refusing it)."""
    shape = schemas.branch_of(body, schemas.RUN_KEYS)
    return shape, schemas.parse(schemas.SHAPES[shape][0], body) if shape in schemas.SHAPES else None


def _check_items(service: Service, items: list[dict[str, Any]], stop: threading.Event) -> None:
    """Reject bad items now, not hours later, with what is cheap to check (`Service.draft`: milliseconds an item,
    on a worker thread). Compiling an item's schema and searching its budget take up to seconds each, so they
    wait until the item runs: a thousand items are acknowledged in seconds, not half an hour. Ends at the next item
    once `stop` is set (`stoppable_thread`: nobody awaits the answer any more)."""
    for index, item in enumerate(items):
        if stop.is_set():
            return
        reference = item.get("external_reference")
        if reference is not None and not isinstance(reference, str):  # as QueuedItem says: echoed as sent, so a string
            raise bad_input(f"Error: at '/requests/{index}/external_reference': Input should be a valid string",
                            f"requests[{index}].external_reference")
        if reference is not None and len(reference) > schemas.MAX_EXTERNAL_REFERENCE:
            raise bad_input(f"Error: at '/requests/{index}/external_reference': String should have at most "
                            f"{schemas.MAX_EXTERNAL_REFERENCE} characters", f"requests[{index}].external_reference")
        item = {k: v for k, v in item.items() if k != "external_reference"}
        if (error := _item_error(service, index, item)) is not None:
            raise error


def _item_error(service: Service, index: int, item: dict[str, Any]) -> ApiError | None:
    """The item's refusal, naming it; raised by the caller, outside this `except`, so that it carries neither the
    refusal's frames nor its context: they hold the item's token lists, freed here on the worker thread rather than
    on the event loop (a third of a second for an 8 MB prompt's)."""
    try:
        service.draft(dataclasses.replace(parse_run(service, item), stream=False), priority=Priority.BATCH)
    except ApiError as exc:
        return ApiError(exc.status, exc.code, f"{exc.message} (in requests[{index}])")
    return None


async def _queue(service: Service, model: str, body: Any, request: Request) -> dict[str, Any]:
    items = body["requests"]  # as sent: the queue stores and replays the raw bodies
    if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
        schemas.parse(schemas.BatchInput, body)  # the schema's own message
    limit = service.settings.max_batch_requests
    if len(items) > limit:
        raise bad_input(f"Error: at '/requests': at most {limit} requests per batch, got {len(items)}")
    # Each item's error names requests[i]. A client that leaves meanwhile gets no request_id: nothing is queued for it.
    await unless_client_leaves(request, stoppable_thread(_check_items, service, items))
    try:
        batch_id = await service.write("the batch queue", service.batch_store.create, model, items)
    except QueueFull as full:
        raise ApiError(503, 3040, f"AiError: the batch queue is full: it holds {full.used} of its {full.limit} bytes and "
                                  f"this batch takes {full.adding} (finished batches are kept until their results are "
                                  "polled, or expire); poll the finished batches' results or try again later.") from None
    request.app.state.batch_worker.notify()
    return envelope({"status": "queued", "request_id": batch_id, "model": model})


async def _poll(service: Service, body: dict[str, Any]) -> dict[str, Any] | JSONResponse:
    """The batch's status, or once done its results. The status is read on the loop (`BatchStore.status`, on an index);
    the results are read, built and encoded on a worker thread: the read decodes every item's stored body and result
    (~65 ms for 1000 items), and every batch client polls in a loop, so on the event loop each such poll stalled every
    stream and /health. The batch is freed there too; only the encoded answer comes back."""
    poll = schemas.parse(schemas.PollInput, body)
    status = service.batch_store.status(poll.request_id)
    if status is None:
        raise _unknown_batch(poll.request_id)
    if status != "done":
        return envelope({"status": status, "request_id": poll.request_id})
    to_collect, answer = await asyncio.to_thread(_answer_poll, service, poll.request_id)
    if to_collect:  # its results read: they may make room for new batches (`batch.store.STORED_BYTES`)
        try:
            await service.write("the batch queue", service.batch_store.collect, poll.request_id)
        except ApiError:
            pass  # the results are answered all the same; the batch stays uncollected (kept) until a poll marks it
    return answer


def _unknown_batch(request_id: str) -> ApiError:
    return bad_input(f"Error: no queued request with request_id {request_id!r} (unknown, or its results expired)")


def _answer_poll(service: Service, request_id: str) -> tuple[bool, JSONResponse]:
    """(whether the poll collects the batch: not collected yet, the encoded results) of a finished batch. Blocking: a
    worker thread's."""
    batch = service.batch_store.get(request_id)
    if batch is None:  # deleted (retention) since its status was read
        raise _unknown_batch(request_id)
    return not batch.collected, JSONResponse(envelope(_results(batch)))


def _results(batch: Batch) -> dict[str, Any]:
    """A finished batch's answer: each item's entry in request order, the usage summed, Responses items' `results`."""
    responses, totals = [], {"prompt_tokens": 0, "completion_tokens": 0}
    for item in batch.items:
        # `external_reference` always there, null when not sent, as the hosted poll examples show it
        entry = {"id": item.index, "result": item.result if item.success else {}, "success": bool(item.success),
                 "external_reference": item.external_reference}
        if not item.success:  # no result holds its usage: tokens it consumed before it failed are still in the total
            entry["errors"] = [item.result]
            entry["usage"] = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                              "total_tokens": item.prompt_tokens + item.completion_tokens}
        responses.append(entry)
        totals["prompt_tokens"] += item.prompt_tokens
        totals["completion_tokens"] += item.completion_tokens
    totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    answer = {"responses": responses, "usage": totals, "request_id": batch.batch_id, "status": "done"}
    if all("input" in item.body for item in batch.items):  # Responses items (the queue checked each item's shape)
        answer["results"] = [_response_of(batch, item) for item in batch.items]
    return answer


CLIENT_CODES = frozenset({8, 3039, 5005, 5006, 5007})  # an item's failures that are its request's fault (a 400 when sync)


def _response_of(batch: Batch, item: BatchItem) -> dict[str, Any]:
    """A Responses item's entry in `results`, the shape gpt-oss's model schema documents for a finished batch
    (`Responses_Async_Output`): its Response object, or for a failed item a failed Response carrying `error` (no
    response was made, so its `id` is null) and the tokens it consumed."""
    if item.success:
        return item.result
    error = ApiError(400 if item.result["code"] in CLIENT_CODES else 500, item.result["code"], item.result["message"])
    return {"id": None, "object": "response", "created_at": int(batch.created_at), "model": batch.model, "status": "failed",
            "error": openai_error_object(error), "incomplete_details": None, "output": [], "output_text": "",
            "usage": {"input_tokens": item.prompt_tokens, "output_tokens": item.completion_tokens,
                      "total_tokens": item.prompt_tokens + item.completion_tokens}}


def batch_executor(service: Service):
    """What the batch worker runs per item: exactly the sync path, at batch priority."""

    async def execute(model: str, body: dict[str, Any], key: str) -> ItemOutcome:
        surface = None
        try:
            service.check_model(model)
            ask = dataclasses.replace(await asyncio.to_thread(parse_run, service, body), stream=False)  # bodies of MBs
            plan = await service.plan_off_loop(ask, priority=Priority.BATCH)  # the grammar's checks run here, not at queue time
            # A Responses answer is stored before the worker marks the item done: run again after a crash between the
            # two, the item's answer replaces the first under its id rather than leaving it an orphan (hunt round 18 B-F4).
            surface = surface_of(service, plan, response_id=results.new_id("resp", f"batch/{key}"))
            result = await surfaces.complete(service, plan, surface)
            return ItemOutcome(True, result, surface.outcome.prompt_tokens, surface.outcome.completion_tokens)
        except ApiError as exc:
            # Once generation started, /metrics bills the item's tokens however it ended: its usage says the same.
            spent = surface.outcome if surface is not None else Outcome()
            return ItemOutcome(False, {"code": exc.code, "message": exc.message}, spent.prompt_tokens, spent.completion_tokens)

    return execute


_TEXT_GENERATION = {"id": "text-generation", "name": "Text Generation",
                    "description": "Family of generative text models, such as large language models (LLM), that can be adapted for a variety of natural language tasks."}


@router.get("/models/search", summary="The models this server serves, filtered and paged as Cloudflare's search")
async def models_search(account_id: str, request: Request, page: int = Query(1, ge=1, le=schemas.MAX_LIMIT),
                        per_page: int = Query(20, ge=1, le=schemas.MAX_LIMIT), search: str | None = None, task: str | None = None,
                        author: str | None = None, source: float | None = Query(None, allow_inf_nan=False),
                        hide_experimental: bool = False):
    """Cloudflare's SDKs list models by asking page after page until one is empty (`for m in client.ai.models.list()`):
    a page past the end must be `[]`, or the loop never ends. `search` matches a name or description, `task` a task's
    name or id, `author` the model's maker, as the hosted search does; none of ours is experimental."""
    service = service_of(request)
    entries = [_model_entry(name, service.engine.info.max_model_len) for name in service.model_names]
    found = [entry for entry in entries if _matches(entry, search, task, author, source)]
    shown = found[(page - 1) * per_page: page * per_page]
    return {**envelope(shown), "result_info": {"page": page, "per_page": per_page, "count": len(shown), "total_count": len(found)}}


def _matches(entry: dict[str, Any], search: str | None, task: str | None, author: str | None, source: float | None) -> bool:
    """An empty filter is no filter (a form or an SDK may send unset ones as empty strings)."""
    fold = str.casefold
    search, task, author = search or None, task or None, author or None
    return ((search is None or fold(search) in fold(entry["name"]) or fold(search) in fold(entry["description"]))
            and (task is None or fold(task) in (fold(entry["task"]["name"]), fold(entry["task"]["id"])))
            and (author is None or fold(author) == _AUTHOR)
            and (source is None or source == entry["source"]))


_AUTHOR = "openai"  # every model served here is one of OpenAI's gpt-oss


@router.get("/tasks/search", summary="The tasks of the models served (Cloudflare's SDKs: `ai.tasks.list`)")
async def tasks_search(account_id: str, request: Request):
    return envelope([_TEXT_GENERATION])


@router.get("/authors/search", summary="The makers of the models served (Cloudflare's SDKs: `ai.authors.list`)")
async def authors_search(account_id: str, request: Request):
    return envelope([{"id": _AUTHOR, "name": _AUTHOR, "description": "OpenAI's open-weight gpt-oss models"}])


def _model_entry(name: str, context_window: int) -> dict[str, Any]:
    """`context_window`: what this server serves (`--max-model-len`, or what the KV cache holds), which a client sizes its
    prompts by; not the model's 131072, which a request here may not get."""
    size = name.rsplit("-", 1)[-1]
    return {
        "id": name, "source": 1, "name": name,
        "description": f"OpenAI's open-weight gpt-oss-{size} reasoning model, served locally by ossrun.",
        "task": _TEXT_GENERATION,
        "tags": [], "properties": [{"property_id": "context_window", "value": str(context_window)}, {"property_id": "lora", "value": "true"}],
    }


@router.get("/models/schema", summary="Input and output JSON schemas of a model")
async def models_schema(account_id: str, request: Request, model: str):
    service_of(request).check_model(model)
    return envelope({"input": schemas.input_schema(), "output": schemas.output_schema()})


# The fine-tune routes alone also answer with a trailing `/`: Cloudflare's LoRA page writes its curl commands so
# (`POST …/ai/finetunes/`, `…/finetune-assets/`). Served, not redirected: a redirected POST loses its body in many clients.
@router.post("/finetunes", summary="Create a LoRA fine-tune", openapi_extra=schemas.body_schema(schemas.FinetuneCreate))
@router.post("/finetunes/", include_in_schema=False)
async def create_finetune(account_id: str, request: Request):
    service = service_of(request)
    spec = await json_body(request, partial(schemas.parse, schemas.FinetuneCreate))
    service.check_model(spec.model)
    from ossrun.finetunes import FinetuneError

    try:  # on a thread: it writes and fsyncs the fine-tune's meta.json
        record = await service.write("the fine-tunes", service.create_finetune, spec.model, spec.name, spec.description or "",
                                     spec.public)
    except FinetuneError as exc:
        raise ApiError(exc.status, exc.code, f"AiError: {exc}") from None
    return envelope(_finetune_json(record))


@router.get("/finetunes", summary="List fine-tunes")
@router.get("/finetunes/", include_in_schema=False)
async def list_finetunes(account_id: str, request: Request):
    return envelope([_finetune_json(r) for r in service_of(request).finetunes.list()])


FINETUNE_ORDER = ("id", "name", "model", "description", "created_at", "modified_at")  # the answer's own fields


@router.get("/finetunes/public", summary="List the fine-tunes created with public: true, paged and ordered as Cloudflare's")
@router.get("/finetunes/public/", include_in_schema=False)
async def list_public_finetunes(account_id: str, request: Request, limit: int | None = Query(None, ge=1, le=schemas.MAX_LIMIT),
                                offset: int = Query(0, ge=0, le=schemas.MAX_LIMIT),
                                order_by: str | None = Query(None, json_schema_extra={"enum": list(FINETUNE_ORDER)})):
    """Cloudflare's SDKs send `limit`, `offset` and `order_by` (`ai.finetunes.public.list`); a client paging by
    offset stops at a short page, so each must be honoured or the pager never ends. `order_by` names a field of
    the answer (ascending); without it, `GET …/finetunes`' order (by creation)."""
    if order_by is not None and order_by not in FINETUNE_ORDER:  # the document states the names (the fuzzer found it did not)
        raise bad_input(f"Error: at '/order_by': must be one of {', '.join(FINETUNE_ORDER)}, not {order_by[:100]!r}", "order_by")
    found = [_finetune_json(r) for r in service_of(request).finetunes.list() if r.public]
    if order_by:
        found.sort(key=lambda entry: entry[order_by])
    return envelope(found[offset:None if limit is None else offset + limit])


NOT_A_FORM = (400, 3039, "AiError: expected a multipart form with 'file_name' and 'file'")
MAX_FORM_FIELD = 1024  # bytes of a form field other than the file (a file name) or of a part's header
# Parts a form may have: `file_name` and `file`, and room for what a client adds beside them. Millions of empty
# fields parsed on the event loop slowed every other request tenfold for 44 s (hunt round 15 B-F6).
MAX_FORM_PARTS = 16
READ_FIELDS = ("file_name",)  # the fields the route reads; the others are parsed past, not kept
WRITE_PIECE = 1024 * 1024  # bytes of the file gathered before they are written, off the event loop


class UploadForm:
    """An upload's multipart form, parsed as it arrives: the `file` part's bytes are gathered for the caller to
    write (`take`), the fields the route reads kept (`READ_FIELDS`: a KB each at most), at most `MAX_FORM_PARTS` parts.
    The file is never whole in memory: an adapter may be 300 MB, and each upload in flight once held all of it
    (hunt_security #5); nor are fields nobody reads (4.5 million empty ones held 290 MB, hunt round 15 B-F6)."""

    def __init__(self, boundary: bytes):
        self.fields: dict[str, str] = {}
        self.files = 0
        self.parts = 0
        self.gathered = 0  # bytes of the file not yet taken
        self._pieces: list[bytes] = []
        self._header: list[bytes] = [b"", b""]  # the name and value of the part's header being read
        self._disposition, self._name, self._data = b"", "", bytearray()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_name, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data, "on_part_end": self._part_end})

    def take(self) -> list[bytes]:
        pieces, self._pieces, self.gathered = self._pieces, [], 0
        return pieces

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_FORM_PARTS:
            _form_error(f"more than {MAX_FORM_PARTS} parts")
        self._disposition, self._name, self._data = b"", "", bytearray()

    def _header_name(self, data: bytes, start: int, end: int) -> None:
        self._add_to_header(0, data[start:end])

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._add_to_header(1, data[start:end])

    def _add_to_header(self, which: int, text: bytes) -> None:
        if len(self._header[which]) + len(text) > MAX_FORM_FIELD:
            _form_error("a part's header is too long")
        self._header[which] += text

    def _header_end(self) -> None:
        if self._header[0].strip().lower() == b"content-disposition":
            self._disposition = self._header[1].strip()
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        self._name = parse_options_header(self._disposition)[1].get(b"name", b"").decode("utf-8", "replace")
        self.files += self._name == "file"
        if self.files > 1:
            _form_error("one 'file' per upload")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            self._pieces.append(data[start:end])
            self.gathered += end - start
        elif len(self._data) + end - start <= MAX_FORM_FIELD:
            self._data += data[start:end]
        else:
            _form_error(f"the field {self._name[:100]!r} is too long")

    def _part_end(self) -> None:
        if self._name in READ_FIELDS:
            self.fields.setdefault(self._name, self._data.decode("utf-8", "replace"))

    @property
    def complete(self) -> bool:
        """Whether the form's closing boundary arrived: `finalize` does not check it (python-multipart's TODO), and a
        body cut short would otherwise be stored as if whole (hunt round 15 B-F7)."""
        return self.parser.state == MultipartState.END


def _form_error(what: str) -> NoReturn:
    raise ApiError(400, 3039, f"AiError: {what} in the multipart form")


def check_form(request: Request) -> bytes:
    """An upload's multipart boundary, else the 400 of a body that is no form (before it is read)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type.lower() != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(*NOT_A_FORM)
    return options[b"boundary"]


async def receive_upload(request: Request, arrived: Path) -> str:
    """Write the `file` of an upload's form to `arrived` as it comes (the body cap, deadline and decoding are the
    middleware's) → its `file_name`. A `file_name` naming no asset is refused as soon as it has arrived (curl's `-F`
    sends it before the file), not after up to 300 MB more."""
    from ossrun.finetunes import check_file_name

    form = UploadForm(check_form(request))
    with open(arrived, "wb") as out:
        try:
            async for chunk in request.stream():
                form.parser.write(chunk)
                if "file_name" in form.fields:
                    check_file_name(form.fields["file_name"])
                if form.gathered >= WRITE_PIECE:
                    await asyncio.to_thread(out.writelines, form.take())
            form.parser.finalize()
        except FormParserError:
            raise ApiError(*NOT_A_FORM) from None
        if not form.complete:  # the caller discards what arrived
            raise ApiError(400, 3039, "AiError: the multipart form is incomplete: the body ended before its closing boundary")
        await asyncio.to_thread(out.writelines, form.take())
    if "file_name" not in form.fields or not form.files:
        raise ApiError(400, 3039, "AiError: missing 'file_name' or 'file' in the multipart form")
    return form.fields["file_name"]


@router.post("/finetunes/{id_or_name}/finetune-assets", summary="Upload adapter_config.json or adapter_model.safetensors")
@router.post("/finetunes/{id_or_name}/finetune-assets/", include_in_schema=False)
async def upload_asset(account_id: str, id_or_name: str, request: Request):
    service = service_of(request)
    from ossrun.finetunes import ASSET_NAMES, FinetuneError

    try:
        # What is known before the body, before an upload place is taken: a bogus upload holding one for as long as it
        # sends (up to 300 MB) kept every other at 429 (hunt round 17 A-F8).
        service.finetunes.existing(id_or_name)  # in memory: no file is read
        check_form(request)
        with service.writing("the fine-tunes"):
            arrived = service.finetunes.arrival()  # a place, or a 429 before the body is read
            try:
                file_name = await receive_upload(request, arrived)
            except BaseException:  # a bad form, the body cap or deadline (ApiError), a client that left (499)
                service.finetunes.discard(arrived)
                raise
            # Storing (fsync'd) and loading up to 300 MB takes a while: other requests' streams must not wait for it.
            # The store discards the upload when done; shielded, so a cancelled request still leaves that to it.
            record = await asyncio.shield(asyncio.to_thread(service.upload_finetune_asset, id_or_name, file_name, arrived))
    except FinetuneError as exc:
        raise ApiError(exc.status, exc.code, f"AiError: {exc}", headers=exc.headers) from None
    answer = envelope(_finetune_json(record))
    if file_name in service.finetunes.pending_assets(record):
        other = next(name for name in ASSET_NAMES if name != file_name)
        answer["messages"].append({"code": 5005, "message": f"{file_name} does not fit the stored {other} (another rank, "
                                                            f"or other target modules): it waits for the {other} that "
                                                            f"fits it, and the fine-tune serves its previous pair until then"})
    return answer


def _finetune_json(record) -> dict[str, Any]:
    return {"id": record.id, "name": record.name, "model": record.model, "created_at": record.created_at,
            "modified_at": record.modified_at, "description": record.description, "public": record.public}
