"""What every route answers, as pydantic models, and the pass that writes them into the OpenAPI document.

The routes build plain dicts (results.py); these models only document them, so the fuzz test can
hold each real answer against its declared schema. Errors are documented with the status codes the
server really sends (400, never FastAPI's default 422) in the envelope of their surface.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ossrun.api.errors import is_openai_path


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- usage ---------------------------------------------------------------------------------------------

class PromptTokensDetails(_Out):
    cached_tokens: int = Field(ge=0)


class CompletionTokensDetails(_Out):
    reasoning_tokens: int = Field(ge=0)


class Usage(_Out):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails
    cost_usd: float = Field(ge=0, description="At the hosted price per million tokens")
    neurons: float = Field(ge=0, description="At the hosted neuron rates")


# -- Prompt ----------------------------------------------------------------------------------------------

class PromptToolCall(_Out):
    name: str
    arguments: Any = Field(description="The parsed JSON arguments (the raw text when they do not parse)")


FINISH_REASON = Field(description="Why it ended: `length` when `max_tokens` cut the answer (or the reasoning before it), "
                     "`tool_calls`, or `stop`; not in the hosted shape, where a cut answer gave no sign")


class PromptResult(_Out):
    response: Any = Field(description="The answer text; in JSON mode (response_format) the parsed JSON value (the text "
                          "as it is when `max_tokens` cut it)")
    finish_reason: Literal["stop", "tool_calls", "length"] = FINISH_REASON
    usage: Usage
    tool_calls: list[PromptToolCall] | None = None
    logprobs: ChoiceLogprobs | None = Field(
        None, description="With `logprobs: true`: the answer text's tokens, as a Messages choice lists them")


# -- chat completions ------------------------------------------------------------------------------------

class FunctionCallOut(_Out):
    name: str
    arguments: str


class ChatToolCall(_Out):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ChatMessageOut(_Out):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = Field(None, description="The same text as `reasoning_content`, under the name vLLM and "
                                  "OpenAI's Agents SDK read")
    refusal: None = None
    tool_calls: list[ChatToolCall] = []
    function_call: FunctionCallOut | None = Field(None, description="The call, when the request offered legacy `functions` (/v1)")


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Out):
    content: list[TokenLogprobOut]
    refusal: None = Field(description="OpenAI's refusal tokens: always null (gpt-oss writes no refusal part)")


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "function_call"]
    stop_reason: str | int | None = None


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice] = Field(min_length=1)
    usage: Usage


# -- Responses -------------------------------------------------------------------------------------------

class ReasoningText(_Out):
    type: Literal["reasoning_text"]
    text: str


class SummaryText(_Out):
    type: Literal["summary_text"]
    text: str


class ReasoningItem(_Out):
    type: Literal["reasoning"]
    id: str
    summary: list[SummaryText] = Field(description="With `reasoning.summary`: the reasoning text as one part (gpt-oss "
                                       "has no separate summariser), else []")
    content: list[ReasoningText]
    encrypted_content: str | None = Field(None, description="with include: ['reasoning.encrypted_content']: the reasoning, "
                                          "for a later request to send back (store: false); not encrypted")


class OutputText(_Out):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[TokenLogprobOut] = Field([], description='The text\'s tokens with `include: ["message.output_text.logprobs"]`, else []')


class MessageItem(_Out):
    type: Literal["message"]
    id: str
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallItem(_Out):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = Annotated[Union[ReasoningItem, MessageItem, FunctionCallItem], Field(discriminator="type")]
ContentPart = Annotated[Union[ReasoningText, OutputText, SummaryText], Field(discriminator="type")]


class InputTokensDetails(_Out):
    cached_tokens: int = Field(ge=0)
    cache_write_tokens: int = Field(ge=0, description="Prompt tokens this request made findable in the prefix cache")


class OutputTokensDetails(_Out):
    reasoning_tokens: int = Field(ge=0)


class ResponsesUsage(_Out):
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails
    cost_usd: float = Field(ge=0)
    neurons: float = Field(ge=0)


class ResponseDeleted(_Out):
    id: str
    object: Literal["response"]
    deleted: Literal[True]


class InputTokens(_Out):
    object: Literal["response.input_tokens"]
    input_tokens: int = Field(description="The usage.input_tokens POST /v1/responses reports for the same body")


class InputItemList(_Out):
    object: Literal["list"]
    data: list[dict[str, Any]] = Field(description="Input items (message, function_call, function_call_output, reasoning), each with its id")
    first_id: str | None
    last_id: str | None
    has_more: bool


class IncompleteDetails(_Out):
    reason: str


class FunctionTool(_Out):
    """A tool as a response echoes it: OpenAI's Responses `FunctionTool`, whichever spelling the request used."""

    type: Literal["function"]
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool


class ResponseError(_Out):
    code: Literal["server_error"]
    message: str


class TextFormat(_Out):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None  # json_schema: the format's name, its schema and strict beside it (the Responses spelling)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class NamespaceToolEcho(_Out):
    """A namespace tool as a response echoes it (`results.echoed_tool`): its functions as `FunctionTool`s."""

    type: Literal["namespace"]
    name: str
    description: str | None
    tools: list[FunctionTool]


class WebSearchToolEcho(_Out):
    """A web search tool, echoed as sent (accepted, not offered to the model)."""

    type: str


class ResponseText(_Out):
    format: TextFormat = Field(description="The format the answer was held to (`text.format`, or a `response_format`) "
                               "in the Responses spelling; `{\"type\": \"text\"}` when none was asked")


class ResponseObject(_Out):
    id: str
    object: Literal["response"]
    created_at: int
    model: str
    # `queued`: only the answer to a `background: true` create without `stream` (the run then goes on; retrieve polls it).
    status: Literal["completed", "incomplete", "in_progress", "failed", "cancelled", "queued"]
    completed_at: int | None = Field(description="When it completed (Unix seconds); null unless `status` is completed")
    output: list[OutputItem]
    output_text: str
    usage: ResponsesUsage | None
    tools: list[FunctionTool | NamespaceToolEcho | WebSearchToolEcho]  # as `results.echoed_tool` spells each
    parallel_tool_calls: bool
    # Always present, null when unset, as OpenAI sends them: `error` with status "failed" (a stream's
    # `response.failed`), `incomplete_details` with status "incomplete".
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    text: ResponseText
    truncation: Literal["auto", "disabled"] = Field(description="As sent (`disabled` when not): `auto` drops the "
                                                    "conversation's oldest items when it does not fit the context window")


# -- completions and models ------------------------------------------------------------------------------

class TextChoice(_Out):
    index: int
    text: str
    logprobs: Any = None
    finish_reason: Literal["stop", "length"]
    stop_reason: str | None = None  # the stop string that ended the text


class TextCompletion(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice] = Field(min_length=1)
    usage: Usage


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


# -- batch queue -----------------------------------------------------------------------------------------

class Queued(_Out):
    status: Literal["queued"]
    request_id: str
    model: str


class BatchPending(_Out):
    status: Literal["queued", "running"]
    request_id: str


class BatchUsage(_Out):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class BatchItemResult(_Out):
    id: int
    result: Any
    success: bool
    external_reference: str | None = Field(description="As the item sent it; null when it sent none")
    usage: BatchUsage | None = Field(None, description="A failed item's tokens (a successful one's are in its result's usage)")
    errors: list[ErrorItem] | None = Field(None, description="A failed item's error (its `result` is `{}`); absent on success")


class BatchItemError(_Out):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: None
    code: str = Field(description="The Workers AI error code, as a string (OpenAI's error object)")


class BatchFailedUsage(_Out):
    """The tokens a failed item consumed before it failed (in the batch's `usage` too)."""
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class BatchFailedResponse(_Out):
    id: None = Field(description="No response was made")
    object: Literal["response"]
    created_at: int
    model: str
    status: Literal["failed"]
    error: BatchItemError
    output: list[OutputItem] = Field(max_length=0)
    output_text: str
    usage: BatchFailedUsage


class BatchDone(_Out):
    status: Literal["done"]
    request_id: str
    responses: list[BatchItemResult]
    results: list[ResponseObject | BatchFailedResponse] | None = Field(
        None, description="Only when every item is Responses-shaped: the items' Response objects in request order, as "
                          "gpt-oss's model schema documents a finished batch (`Responses_Async_Output`)")
    usage: BatchUsage


# -- the Workers AI envelopes ----------------------------------------------------------------------------

class Task(_Out):
    id: str
    name: str
    description: str


class ModelEntry(_Out):
    id: str
    source: int
    name: str
    description: str
    task: Task
    tags: list[str]
    properties: list[dict[str, Any]]


class ModelSchemas(_Out):
    input: dict[str, Any]
    output: dict[str, Any]


class FinetuneOut(_Out):
    id: str
    name: str
    model: str
    created_at: str
    modified_at: str
    description: str
    public: bool


# -- stream frames (spec §5): one model per `data:` payload ---------------------------------------------

class PromptFrame(_Out):
    response: str
    finish_reason: Literal["stop", "tool_calls", "length"] | None = None  # on the last frame only (with usage)
    usage: Usage | None = None
    tool_calls: list[PromptToolCall] | None = None
    logprobs: ChoiceLogprobs | None = None  # with `logprobs: true`, on each text frame: its tokens


class ChunkFunction(_Out):
    name: str | None = None
    arguments: str | None = None


class ChunkToolCall(_Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction


class ChunkDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text as reasoning_content (ChatMessageOut.reasoning)
    tool_calls: list[ChunkToolCall] | None = None
    function_call: ChunkFunction | None = None  # the legacy `functions` call's name, then its arguments


class ChunkChoice(_Out):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "function_call"] | None = None
    stop_reason: str | None = None  # on the chunk with finish_reason: the stop string that ended the answer


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(_Out):
    index: int
    text: str
    logprobs: Any = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | None = None


class CompletionChunk(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ResponsesEvent(_Out):
    type: Literal["response.created", "response.in_progress", "response.output_item.added", "response.output_item.done",
                  "response.content_part.added", "response.content_part.done", "response.reasoning_text.delta",
                  "response.reasoning_text.done", "response.reasoning_summary_part.added",
                  "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done",
                  "response.reasoning_summary_part.done", "response.output_text.delta", "response.output_text.done",
                  "response.function_call_arguments.delta", "response.function_call_arguments.done",
                  "response.completed", "response.incomplete", "response.failed"]
    sequence_number: int = Field(ge=0)
    response: ResponseObject | None = None
    output_index: int | None = None
    item_id: str | None = None
    content_index: int | None = None
    summary_index: int | None = None  # on the reasoning_summary_* events (with `reasoning.summary`): always 0
    part: ContentPart | None = None  # on content_part.* and reasoning_summary_part.*
    status: Literal["incomplete"] | None = None  # on reasoning_summary_part.done: max_output_tokens cut the reasoning
    delta: str | None = None
    logprobs: list[TokenLogprobOut] | None = None  # on output_text deltas and dones: the text's tokens when asked for, else []
    item: OutputItem | None = None
    name: str | None = None  # on function_call_arguments.done: the function's name, as OpenAI sends it


class StreamErrorDetail(_Out):
    """/ai/run: `{message, code}` with Workers AI's code; /v1: OpenAI's error object, its code a string."""

    message: str
    code: int | str
    type: str | None = None
    param: str | None = None


class StreamError(_Out):
    """What a chunk stream sends instead of its next frame when generation fails mid-way (then `[DONE]`); a Responses
    stream sends `response.failed` instead."""

    error: StreamErrorDetail


class _Envelope(_Out):
    success: Literal[True]
    errors: list[Any] = Field(max_length=0)
    messages: list[Any]


class RunEnvelope(_Envelope):
    result: Union[PromptResult, ChatCompletion, ResponseObject, Queued, BatchPending, BatchDone]


class ModelsEnvelope(_Envelope):
    result: list[ModelEntry]


class TasksEnvelope(_Envelope):
    result: list[Task]


class Author(_Out):
    id: str
    name: str
    description: str


class AuthorsEnvelope(_Envelope):
    result: list[Author]


class SchemaEnvelope(_Envelope):
    result: ModelSchemas


class FinetuneEnvelope(_Envelope):
    result: FinetuneOut


class FinetunesEnvelope(_Envelope):
    result: list[FinetuneOut]


class ErrorItem(_Out):
    code: int
    message: str


class ErrorEnvelope(_Out):
    result: dict[str, Any] | None
    success: Literal[False]
    errors: list[ErrorItem] = Field(min_length=1)
    messages: list[Any]


class OpenAIErrorDetail(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(_Out):
    error: OpenAIErrorDetail


class Health(_Out):
    status: Literal["ok"]
    model: str
    running: int = Field(description="Sequences holding an engine slot: each choice of `n`, for each prompt of a list")
    waiting: int = Field(description="Sequences waiting for an engine slot")
    running_requests: int = Field(description="Requests with at least one sequence running (`ossrun_running_requests`)")
    waiting_requests: int = Field(description="Requests with no sequence running yet (`ossrun_queue_depth`)")
    kv_blocks_used: int
    kv_blocks_total: int
    batch_store: Literal["ok", "failing"] = Field(description="\"failing\" while the batch queue's store keeps failing "
                                                  "(the queue stands still; interactive requests are still served)")


RESPONSE_MODELS = (PromptFrame, ChatCompletionChunk, CompletionChunk, ResponsesEvent, StreamError, RunEnvelope, ModelsEnvelope, TasksEnvelope, AuthorsEnvelope, SchemaEnvelope, FinetuneEnvelope, FinetunesEnvelope, ErrorEnvelope,
                   ChatCompletion, ResponseObject, ResponseDeleted, InputItemList, InputTokens, TextCompletion, ModelCard, ModelList, OpenAIError, Health)

# (path suffix, method) → (success model, stream frame models, error statuses). Suffixes match both OpenAI prefixes.
ROUTES: dict[tuple[str, str], tuple[type[BaseModel] | None, tuple[type[BaseModel], ...], tuple[int, ...]]] = {
    ("/ai/run/{model}", "post"): (RunEnvelope, (PromptFrame, ChatCompletionChunk, ResponsesEvent), (400, 403, 408, 413, 415, 429, 503)),
    ("/ai/models/search", "get"): (ModelsEnvelope, (), (400, 403)),
    ("/ai/tasks/search", "get"): (TasksEnvelope, (), (403,)),
    ("/ai/authors/search", "get"): (AuthorsEnvelope, (), (403,)),
    ("/ai/models/schema", "get"): (SchemaEnvelope, (), (400, 403)),
    ("/ai/finetunes", "post"): (FinetuneEnvelope, (), (400, 403, 413, 415, 429, 503)),
    ("/ai/finetunes", "get"): (FinetunesEnvelope, (), (403,)),
    ("/ai/finetunes/public", "get"): (FinetunesEnvelope, (), (400, 403)),
    ("/finetune-assets", "post"): (FinetuneEnvelope, (), (400, 403, 413, 415, 429, 503)),
    ("/v1/chat/completions", "post"): (ChatCompletion, (ChatCompletionChunk,), (400, 403, 408, 413, 415, 429, 503)),
    ("/v1/responses", "post"): (ResponseObject, (ResponsesEvent,), (400, 403, 408, 413, 415, 429, 503)),
    ("/v1/completions", "post"): (TextCompletion, (CompletionChunk,), (400, 403, 408, 413, 415, 429, 503)),
    ("/v1/models", "get"): (ModelList, (), (403,)),
    ("/v1/models/{model_id}", "get"): (ModelCard, (), (403, 404)),
    ("/v1/responses/input_tokens", "post"): (InputTokens, (), (400, 403, 413, 415)),
    # 405: a path naming another endpoint's (`/v1/responses/input_tokens`, POST only), which the id's pattern excludes
    ("/v1/responses/{response_id}", "get"): (ResponseObject, (ResponsesEvent,), (400, 403, 404, 405)),
    ("/v1/responses/{response_id}/cancel", "post"): (ResponseObject, (), (400, 403, 404)),
    ("/v1/responses/{response_id}", "delete"): (ResponseDeleted, (), (403, 404, 405, 503)),
    ("/v1/responses/{response_id}/input_items", "get"): (InputItemList, (), (400, 403, 404)),
    ("/health", "get"): (Health, (), ()),
    ("/metrics", "get"): (None, (), ()),
}

_REASONS = {400: "Bad input, unknown model, context too long or LoRA not supported",
            401: "A wrong or missing API token (OpenAI's answer, on the bare /v1 routes)",
            403: "Authentication error: a wrong or missing API token (/v1: 401), or a web page's foreign origin",
            404: "Not found", 405: "Method not allowed: the path names another endpoint (input_tokens takes POST only)",
            408: "Timeout", 413: "Body over 10 MB (adapter uploads: 300 MB), decoded or not",
            415: "Content-Encoding other than gzip or deflate",
            429: "Rate limited (POST requests a minute; too many wrong API tokens), or busy (options.rejectIfBusy, uploads)",
            503: "Shutting down, or the data directory refuses writes (a full disk): try again later"}


@dataclass(frozen=True)
class Guard:
    """What the app's guard (`app._refusal`) answers before any route runs, by the server's settings: the document
    lists those statuses, and the token's scheme, only where they can come."""

    token: bool  # --api-token: a wrong or missing one is a 401 (bare /v1) or 403, and 20 wrong ones a 429
    rate_limited: bool  # --rate-limit above 0: a POST over it is a 429
    open_paths: frozenset[str] = frozenset()  # what needs no token and counts in no limit (/health, /metrics)

    def statuses(self, path: str, method: str) -> set[int]:
        if path in self.open_paths:
            return set()
        refused = {429, 401 if path.startswith("/v1/") else 403} if self.token else set()
        return refused | ({429} if self.rate_limited and method == "post" else set())


BEARER = {"bearer": {"type": "http", "scheme": "bearer", "description": "The server's --api-token"}}

ASSET_UPLOAD = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file_name", "file"],
    "properties": {"file_name": {"type": "string", "enum": ["adapter_config.json", "adapter_model.safetensors"]},
                   "file": {"type": "string", "format": "binary"}}}}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def sse_event_schema(frames: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    """One server-sent event: its `data` is a JSON frame, an error, or `[DONE]`.

    The document is OpenAPI 3.1, where this goes in the stream's `schema` (3.2's `itemSchema` is refused by 3.1
    validators and generators); SSE-aware tools such as Schemathesis read a 3.1 stream's `schema` as one event's.
    `anyOf`, not `oneOf`: contentMediaType and contentSchema are annotations in JSON Schema 2020-12, so the JSON
    branch matches any string, `[DONE]` included, and a oneOf refused the frame every stream ends with."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"anyOf": [_ref(m) for m in (*frames, StreamError)]}}
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"type": "string"}, "data": {"anyOf": [{"const": "[DONE]"}, payload]}}}


def _route_for(path: str, method: str):
    for (suffix, verb), spec in ROUTES.items():
        if verb == method and path.endswith(suffix):
            return spec
    return None


# Bodies whose `model` must name a served model (anything else is a 400, code 5007).
MODEL_BODIES = ("ChatCompletionRequest", "ResponsesRequest", "CompletionRequest", "FinetuneCreate")


def _pin_model_names(document: dict[str, Any], names: list[str]) -> None:
    """`model` (path, query or body) documented as the served names, which is what the server accepts."""
    served = {"type": "string", "enum": list(names)}
    components = document["components"]["schemas"]
    for name in MODEL_BODIES:
        if "model" in components.get(name, {}).get("properties", {}):
            components[name]["properties"]["model"] = {**served, "title": "Model"}
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "model":
                    parameter["schema"] = {**served, "title": "Model"}


def _declare_path_parameters(path: str, operation: dict[str, Any]) -> None:
    """Every `{name}` of the path as a parameter (FastAPI lists only those the handler takes as arguments)."""
    declared = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "path"}
    for name in re.findall(r"{([^}:]+)", path):
        if name not in declared:
            operation.setdefault("parameters", []).append({"name": name, "in": "path", "required": True,
                                                           "schema": {"type": "string", "title": name.replace("_", " ").title()}})


def _require_token(document: dict[str, Any], guard: Guard) -> None:
    """The bearer scheme (Swagger UI's Authorize sends it), required everywhere but the open paths; none without a token."""
    if not guard.token:
        return
    document["components"]["securitySchemes"] = BEARER
    document["security"] = [{"bearer": []}]
    for path in guard.open_paths & set(document.get("paths", {})):
        for operation in document["paths"][path].values():
            operation["security"] = []


def finish_document(document: dict[str, Any], model_names: list[str], guard: Guard) -> dict[str, Any]:
    """Write every route's real answers (success, stream, errors, the guard's refusals) into a FastAPI-generated document."""
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema([(m, "validation") for m in RESPONSE_MODELS], ref_template="#/components/schemas/{model}")
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.update(top.get("$defs", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            _declare_path_parameters(path, operation)
            spec = _route_for(path, method)
            if spec is None:
                continue
            model, frames, errors = spec
            if path.endswith("/finetune-assets"):
                operation["requestBody"] = ASSET_UPLOAD
            ok: dict[str, Any] = {"application/json": {"schema": _ref(model)}} if model else {"text/plain": {"schema": {"type": "string"}}}
            if frames:
                ok["text/event-stream"] = {"schema": sse_event_schema(frames)}
            error_model = OpenAIError if is_openai_path(path) else ErrorEnvelope
            responses = {"200": {"description": "Success" + (" (an SSE stream when `stream` is true)" if frames else ""), "content": ok}}
            # A path parameter that does not route (a '/' in account_id, say) meets no route: 404 in the envelope.
            for status in sorted({*errors, *((404,) if "{" in path else ()), *guard.statuses(path, method)}):
                responses[str(status)] = {"description": _REASONS[status], "content": {"application/json": {"schema": _ref(error_model)}}}
            operation["responses"] = responses
    _pin_model_names(document, model_names)
    _require_token(document, guard)
    return document
