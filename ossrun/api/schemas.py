"""Request shapes as pydantic models: validation with the spec's ranges, and the OpenAPI document.

Extra fields are accepted (clients send more than the schema names); known fields are checked
strictly. `classify` picks the one input shape of `/ai/run` a body matches, as the hosted
JSON Schema's `oneOf` does, and says what was expected when none or several match.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import (AfterValidator, BaseModel, PrivateAttr, BeforeValidator, ConfigDict, Discriminator, Field, GetJsonSchemaHandler, Tag, ValidationError,
                      ValidationInfo, WithJsonSchema, field_validator, model_validator)
from pydantic.json_schema import JsonSchemaValue, models_json_schema
from pydantic_core import CoreSchema

from ossrun.api.errors import ApiError, bad_input, param_of
from ossrun.api.openapi import ChatCompletion, PromptResult, ResponseObject
from ossrun.finetunes import MAX_DESCRIPTION
from ossrun.harmony.shapes import (  # noqa: F401  the conversation shapes harmony renders, part of these bodies
    FunctionCallInput,
    FunctionCallOutputInput,
    FunctionDef,
    InputItem,
    InputMessage,
    ItemReference,
    Message,
    NamespaceTool,
    OpenAIMessage,
    ReasoningInput,
    RequestItem,
    ResponsesTool,
    Shape,
    TextPart,
    Tool,
    ToolCall,
    ToolCallFunction,
    WebSearchTool,
    WrappedTool,
    function_or_flat,
    refused,
    tool_spec,
    str_or_list,
)

Effort = Literal["low", "medium", "high"]
# A stop string is a delimiter: 4,096 characters is far beyond any, and bounds what the matcher holds back of a streamed
# answer while the text half-matches it (it cannot show what may still become the stop) and its table's size.
STOP_MAX_CHARS = 4096
StopText = Annotated[str, Field(min_length=1, max_length=STOP_MAX_CHARS)]
# OpenAI's `seed` is any signed 64-bit integer (its OpenAPI spec, and vLLM, take the whole range); Workers AI's is
# 1 … 9999999999 (spec §2), kept on `/ai/run`. The sampler folds any integer into its generator's range.
OpenAISeed = Annotated[int | None, Field(None, ge=-2**63, le=2**63 - 1)]
# OpenAI's sampling ranges, on `/v1` (and `…/ai/v1`): `temperature` 0 … 2 and `top_p` 0 … 1, where 0 keeps only the
# most likely token (the smallest nucleus). `/ai/run` keeps Workers AI's (spec §2: 0 … 5 and 0.001 … 1), so a body written
# for either API is served as that API serves it. The penalties' ranges (-2 … 2) are the same on both.
OpenAITemperature = Annotated[float | None, Field(None, ge=0, le=2)]
OpenAITopP = Annotated[float | None, Field(None, ge=0, le=1)]
# `top_k` on `/v1` is vLLM's extension (OpenAI has none), where -1 and 0 mean "off": vLLM clients send them explicitly
# (hunt round 19 A-F4), so they parse to None, as if left out. The cut itself keeps Workers AI's 1 … 50 (the sampler's
# candidate path takes the k best of the vocabulary every step: a wide k costs every row of the step; top_p and min_p
# cut wide), and `/ai/run` keeps its schema's 1 … 50 with no "off" value.
VLLMTopK = Annotated[int | None, Field(None, ge=-1, le=50, description="vLLM's extension: keep the k most likely tokens "
                                       "(ties with the k-th kept); -1 or 0: off, as left out"),
                     AfterValidator(lambda k: None if k is not None and k <= 0 else k)]

# The largest answer limit (`max_tokens` and its siblings) a body may state: int32's, as most servers' limits are. Any
# value past the context window is a code-8 400 naming the window; past this one it is a field error like any range.
MAX_LIMIT = 2**31 - 1

INTEGER_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "top_k", "seed", "n", "top_logprobs", "logprobs",
                  "best_of")

# What a request that leaves a field out is sampled with: Workers AI's defaults (spec §2) on `/ai/run`, OpenAI's on
# `/v1` (with 4096 as the output cap where OpenAI has none); never more output than the context has left.
WORKERS_AI_DEFAULTS = {"max_tokens": 256, "temperature": 0.6}
OPENAI_DEFAULTS = {"max_tokens": 4096, "temperature": 1.0}
_OFF = {"top_p": 1.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}


def stated_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """A surface's defaults under every name its shapes give them (the output cap has three)."""
    cap = defaults["max_tokens"]
    return {**_OFF, **defaults, "max_completion_tokens": cap, "max_output_tokens": cap}


class _Open(Shape):
    # Strict like the hosted JSON Schema validator: "0.5" is no number and 1 is no boolean (`Shape`).

    # The `default` the JSON Schema states for sampling fields that are None when left out (so the service can tell
    # "not sent" from a value, and one model serves both surfaces' defaults): what the server really uses.
    STATED_DEFAULTS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        properties = handler.resolve_ref_schema(schema).get("properties", {})
        for name, value in cls.STATED_DEFAULTS.items():
            if name in properties and properties[name].get("type") != "null":  # a sibling shape's name, refused here
                properties[name]["default"] = value
        return schema

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        """JSON Schema's "integer" includes 5.0 (JavaScript cannot tell them apart); strict pydantic does not."""
        if isinstance(data, dict) and any(isinstance(data.get(k), float) and data[k].is_integer() for k in INTEGER_FIELDS):
            data = {**data, **{k: int(data[k]) for k in INTEGER_FIELDS if isinstance(data.get(k), float) and data[k].is_integer()}}
        return data


OPENAI_WRAPPER = ("name", "description", "schema", "strict")
# The wrapper's other keys and their types, as the Responses flat spelling types them (null: left out).
_WRAPPER_TYPES = {"name": (str, "string"), "description": (str, "string"), "strict": (bool, "boolean")}
# A `json_schema` with a `schema` key is OpenAI's wrapper, else Workers AI's schema itself: the wrapper takes
# only OpenAI's keys, typed, and its `schema` is an object (as OpenAI's API refuses anything else with a 400). One
# without `schema` whose keys are all the wrapper's (`{"name": "x", "strict": true}`: a client's schema variable left
# undefined) is a wrapper missing its schema, not a schema (`strict` is no JSON Schema keyword): it would constrain nothing.
_WRAPPER_RULE = {"if": {"type": "object", "required": ["schema"]},
                 "then": {"properties": {**{key: {"type": [kind, "null"]} for key, (_, kind) in _WRAPPER_TYPES.items()},
                                         "schema": {"type": "object"}},
                          "additionalProperties": False},
                 "else": {"not": {"type": "object", "minProperties": 1,
                                  "propertyNames": {"enum": [key for key in OPENAI_WRAPPER if key != "schema"]}}}}


class ResponseFormat(_Open):
    type: Literal["json_object", "json_schema", "text"]
    json_schema: dict[str, Any] | None = Field(
        None, json_schema_extra=_WRAPPER_RULE,
        description="OpenAI's wrapper {name, description, schema, strict}, or (without a `schema` key) Workers AI's schema itself")
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # the Responses API's flat spelling (`text.format`)
    strict: bool | None = None  # the Responses API's flat spelling
    name: str | None = None  # with the flat spelling: the format's name and description, stated to the model
    description: str | None = None

    @field_validator("json_schema")
    @classmethod
    def _openai_wrapper(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if "schema" not in value:
            if value and all(key in _WRAPPER_TYPES for key in value):
                raise refused("schema", value, "wrapper_schema", "json_schema has OpenAI's wrapper keys ({keys}) but no "
                              "schema: send the JSON Schema as json_schema.schema", {"keys": ", ".join(value)})
            return value  # Workers AI's spelling: the schema itself
        if not isinstance(value["schema"], dict):
            raise ValueError("json_schema.schema must be a JSON Schema object")
        unknown = [key for key in value if key not in OPENAI_WRAPPER]
        if unknown:
            raise ValueError(f"json_schema has unknown key {unknown[0]!r} (a wrapper with 'schema' takes {', '.join(OPENAI_WRAPPER)})")
        for key, (kind, name) in _WRAPPER_TYPES.items():
            if value.get(key) is not None and not isinstance(value[key], kind):
                raise refused(key, value[key], "wrapper_type", "json_schema.{key} must be a {kind} or null, not {value}",
                              {"key": key, "kind": name, "value": repr(value[key])})
        return value


class StreamOptions(_Open):
    include_usage: bool | None = None


class RunOptions(_Open):
    rejectIfBusy: bool | None = None


# The mirror of NOT_RESPONSES: what the Responses shape names, which the Prompt and Messages shapes (and chat and
# completions) spell otherwise or have not. Sent beside `messages` or `prompt`, each would be ignored (a client porting
# Responses code would lose its `max_output_tokens` cost cap, its effort, its JSON format, its instructions or the
# stored conversation: hunt round 16 B-F1), so each is a 400 naming it, as OpenAI's chat refuses an unknown argument.
NOT_SAMPLING = {"max_output_tokens": "use max_tokens (or max_completion_tokens)", "reasoning": "use reasoning_effort",
                "text": "use response_format", "instructions": "send them as a system or developer message",
                "previous_response_id": "send the conversation itself (only the Responses shape reads a stored one)"}


class Sampling(_Open):
    """Sampling fields shared by the Prompt and Messages shapes (spec §2)."""

    STATED_DEFAULTS: ClassVar[dict[str, Any]] = stated_defaults(WORKERS_AI_DEFAULTS)

    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=MAX_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_LIMIT)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, ge=0.001, le=1)
    top_k: int | None = Field(None, ge=1, le=50)
    seed: int | None = Field(None, ge=1, le=9999999999)
    repetition_penalty: float | None = Field(None, ge=0, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    raw: bool = False
    lora: str | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    n: int | None = Field(None, ge=1, le=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream_options: StreamOptions | None = None
    reasoning_effort: Effort | None = None
    options: RunOptions | None = None
    max_output_tokens: None = Field(None, description=f"a Responses parameter: {NOT_SAMPLING['max_output_tokens']}")
    reasoning: None = Field(None, description=f"a Responses parameter: {NOT_SAMPLING['reasoning']}")
    text: None = Field(None, description=f"a Responses parameter: {NOT_SAMPLING['text']}")
    instructions: None = Field(None, description=f"a Responses parameter: {NOT_SAMPLING['instructions']}")
    previous_response_id: None = Field(None, description=f"a Responses parameter: {NOT_SAMPLING['previous_response_id']}")

    @field_validator(*NOT_SAMPLING, mode="before")
    @classmethod
    def _a_responses_parameter(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(f"{info.field_name} is a Responses parameter (a body with `input`), not this one's: "
                             f"{NOT_SAMPLING[info.field_name]}")
        return value


class FunctionName(_Open):
    name: str = Field(min_length=1)


class NamedToolChoice(_Open):
    """Chat's spelling: `{type: function, function: {name}}`."""

    type: Literal["function"]
    function: FunctionName


class FlatNamedToolChoice(_Open):
    """The Responses spelling: `{type: function, name}` (one with a `function` key is chat's, as the document says)."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["function"]}})
    type: Literal["function"]
    name: str = Field(min_length=1)


def _choice_model(choice: Any) -> str:
    """The branch a tool_choice (or an allowed tool) is validated as, from its value: a mode, chat's `{function}`, the
    flat `{name}`, or `allowed_tools` in chat's spelling (`{allowed_tools: {mode, tools}}`) or the flat one."""
    if isinstance(choice, (NamedToolChoice, FlatNamedToolChoice, AllowedToolsChoice, FlatAllowedToolsChoice)):
        return type(choice).__name__
    if not isinstance(choice, dict):
        return "str"
    if choice.get("type") == "allowed_tools":
        return "AllowedToolsChoice" if "allowed_tools" in choice else "FlatAllowedToolsChoice"
    return "NamedToolChoice" if "function" in choice else "FlatNamedToolChoice"


_ONE_FUNCTION = "{'type': 'function', 'function': {'name': …}} or {'type': 'function', 'name': …}"


def _function_choice(choice: Any) -> Any:
    """A built-in tool's type, …: one error naming the type, not every branch's complaint."""
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        return choice
    return function_or_flat(choice, "tool_choice", "tool_choice is 'none', 'auto', 'required', one function tool (type "
                            "'function') or allowed_tools", _ONE_FUNCTION)


def _allowed_function(tool: Any) -> Any:
    return function_or_flat(tool, "allowed tool", "allowed_tools lists function tools (type 'function')", _ONE_FUNCTION)


# One function in either spelling: what a named tool_choice, and each entry of allowed_tools, is.
NamedFunction = Annotated[Union[Annotated[NamedToolChoice, Tag("NamedToolChoice")],
                                Annotated[FlatNamedToolChoice, Tag("FlatNamedToolChoice")]],
                          Discriminator(_choice_model), BeforeValidator(_allowed_function)]


class AllowedTools(_Open):
    """OpenAI's `allowed_tools`: only these of `tools` may be called; every tool stays in the prompt (which a prompt
    cache keeps from request to request). `mode` is the tool_choice over them: `auto` or `required`."""

    mode: Literal["auto", "required"]
    tools: list[NamedFunction]

    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.function.name if isinstance(t, NamedToolChoice) else t.name for t in self.tools))


class AllowedToolsChoice(_Open):
    """Chat's spelling: `{type: allowed_tools, allowed_tools: {mode, tools: [{type: function, function: {name}}]}}`."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class FlatAllowedToolsChoice(AllowedTools):
    """The Responses spelling: `{type: allowed_tools, mode, tools: [{type: function, name}]}`."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["allowed_tools"]}})
    type: Literal["allowed_tools"]


ToolChoice = Annotated[Union[Annotated[Literal["none", "auto", "required"], Tag("str")],
                             Annotated[NamedToolChoice, Tag("NamedToolChoice")], Annotated[FlatNamedToolChoice, Tag("FlatNamedToolChoice")],
                             Annotated[AllowedToolsChoice, Tag("AllowedToolsChoice")],
                             Annotated[FlatAllowedToolsChoice, Tag("FlatAllowedToolsChoice")]],
                       Discriminator(_choice_model), BeforeValidator(_function_choice)]


class WithTools(_Open):
    """Function tools, offered on the Prompt shape as on Messages (`functions`: the legacy spelling)."""

    tools: list[Tool] | None = None
    functions: list[FunctionDef] | None = None
    tool_choice: ToolChoice | None = None


# What a prompt sent as is (`raw`, and every /v1/completions prompt) cannot honour, as the document states the 400
# `ask.py` answers: a JSON `response_format` (the grammar starts at `<|start|>assistant`, where such a prompt need
# not stop), tools (nothing renders them into it) and a `tool_choice` asking for a call.
_FREE_TEXT = {"anyOf": [{"type": "null"}, {"properties": {"type": {"const": "text"}}}]}
_RAW_RULE = {"if": {"required": ["raw"], "properties": {"raw": {"const": True}}},
             "then": {"properties": {"response_format": _FREE_TEXT, "tools": {"anyOf": [{"type": "null"}, {"maxItems": 0}]},
                                     "functions": {"anyOf": [{"type": "null"}, {"maxItems": 0}]},
                                     "tool_choice": {"anyOf": [{"type": "null"}, {"enum": ["none", "auto"]}]}}}}


# A JSON `response_format` promises an answer that parses, which a stop string would cut: `stop` with one is the
# 400 `ask.py` answers (none, or an empty list, is accepted).
_STOP_RULE = {"if": {"required": ["response_format"], "properties": {"response_format": {
                  "type": "object", "required": ["type"], "properties": {"type": {"enum": ["json_object", "json_schema"]}}}}},
              "then": {"properties": {"stop": {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}}}}


class PromptInput(Sampling, WithTools):
    model_config = ConfigDict(json_schema_extra={"allOf": [_RAW_RULE, _STOP_RULE]})
    prompt: str = Field(min_length=1)


class MessagesInput(Sampling, WithTools):
    model_config = ConfigDict(json_schema_extra={"allOf": [_STOP_RULE]})
    messages: list[Message] = Field(min_length=1)


SummaryKind = Literal["auto", "concise", "detailed"]
# Both spellings of the summary given: the same value (the document's side of `Reasoning._one_summary`).
_ONE_SUMMARY = {"allOf": [{"if": {"required": ["generate_summary", "summary"], "properties": {
    "generate_summary": {"const": kind}, "summary": {"not": {"type": "null"}}}}, "then": {"properties": {"summary": {"const": kind}}}}
    for kind in get_args(SummaryKind)]}


class Reasoning(_Open):
    """Echoed as `{effort, summary}` (the summary asked by either name; `generate_summary` too when sent), its other keys
    ignored and not echoed."""

    model_config = ConfigDict(json_schema_extra=_ONE_SUMMARY)
    effort: Effort | None = None
    summary: SummaryKind | None = Field(None, description=(
        "Any value: each reasoning item's summary is its reasoning text, one summary_text part (gpt-oss has no "
        "separate summariser), streamed with the reasoning_summary events"))
    # OpenAI's deprecated spelling of `summary` (its values, as the openai SDK types it): echoed as sent. Any string
    # was taken and echoed (an 8 MB one in each full-object event of a stream, and stored: hunt round 17 A-F4).
    generate_summary: SummaryKind | None = Field(None, description="OpenAI's deprecated name of `summary`, read as it "
                                                 "when `summary` is not given (both given: the same value)")

    @model_validator(mode="after")
    def _one_summary(self) -> "Reasoning":
        """`generate_summary` asks for what `summary` does: it was echoed and ignored, so a client using the old name
        got no summary (hunt round 18 C-F5). Two different answers to one question are refused."""
        if self.summary is None:
            self.summary = self.generate_summary
        elif self.generate_summary not in (None, self.summary):
            raise refused("generate_summary", self.generate_summary, "summary_mismatch", "generate_summary (OpenAI's "
                          "deprecated name of summary) is {sent} but summary is {summary}: send one of them",
                          {"sent": repr(self.generate_summary), "summary": repr(self.summary)})
        return self


# OpenAI's limits on `metadata` (its API reference): at most 16 pairs, keys of at most 64 characters, values strings of
# at most 512. It is echoed on the response object, so stored with it and repeated in each full-object event of a stream,
# and no token pays for it: a 9 MB value made every stored response 9 MB (10,000 kept: ~90 GB) and every background
# run's buffer 29 MB (hunt round 15 B-F3, B-F4).
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
Metadata = Annotated[dict[Annotated[str, Field(max_length=MAX_METADATA_KEY)], Annotated[str, Field(max_length=MAX_METADATA_VALUE)]],
                     Field(max_length=MAX_METADATA_PAIRS, description=(
                         f"at most {MAX_METADATA_PAIRS} pairs, keys of at most {MAX_METADATA_KEY} characters, values "
                         f"strings of at most {MAX_METADATA_VALUE} (OpenAI's limits); echoed and stored with the response"))]


class TextConfig(_Open):
    """Echoed as `{format, verbosity}`, its other keys ignored and not echoed."""

    format: ResponseFormat | None = None
    # OpenAI's enum, echoed (gpt-oss has no verbosity setting: its answers are as long as it writes them). Any string
    # was taken and echoed (hunt round 17 A-F4).
    verbosity: Literal["low", "medium", "high"] | None = None


# The limit and sampling names of the sibling shapes (Chat, Prompt) that the Responses shape has not: sent with
# `input`, each would be ignored (a client porting chat code would silently lose its `max_tokens` cost cap), so each
# is a 400 naming it, as OpenAI refuses them; other unknown names stay accepted and ignored. → what to do instead.
NOT_RESPONSES = {"max_tokens": "use max_output_tokens", "max_completion_tokens": "use max_output_tokens",
                 "reasoning_effort": "use reasoning: {\"effort\": ...}",
                 # chat's switch (hunt round 19 A-F3); OpenAI's Responses API takes `top_logprobs` but has no `logprobs`
                 "logprobs": "use include: [\"message.output_text.logprobs\"] (with top_logprobs)",
                 **{name: "the Responses shape has none, so it would be ignored" for name in (
                     "stop", "logit_bias", "frequency_penalty", "presence_penalty", "repetition_penalty", "top_k", "min_p", "n")}}


def _not_here(hint: str) -> Any:
    return Field(None, description=f"not a Responses parameter: {hint}")


# Responses parameters of OpenAI's that ossrun does not implement and that would change what the model reads: ignored,
# the answer would lack what the client believes it sent, so each is a 400 naming it (null is accepted). `conversation`
# (OpenAI's Conversations API, which openai-node's `responses.create({conversation})` and the AI SDK's
# `providerOptions.openai.conversation` send) would prepend that conversation's items and add the answer to it.
UNSUPPORTED_RESPONSES = {"conversation": "conversations are not supported: use previous_response_id",
                         # OpenAI's stored prompt templates (`{id, version, variables}`), kept on OpenAI's side
                         "prompt": "stored prompts are not supported: send their instructions and input"}


# The characters a Responses request's tools may hold that the model is never told, in all: the namespaces'
# descriptions and the web search tools (each as compact JSON, as echoed: it is echoed as sent, Codex's
# `external_web_access` included). Both are echoed in each full-object event of a stream and stored, and no token pays
# for them: 8 MB in one made a 25 MB stream and an 8 MB stored response of 57 prompt tokens (hunt round 17 A-F4), and
# ~256 such requests could evict every other client's stored responses (`STORED_BYTES`). 32,768 takes OpenAI's web
# search allow-list (100 domains) many times over and the namespace descriptions agents send (a sentence or two each),
# and at the store's count bound (10,000) such responses take ~330 MB, far under its byte bound.
MAX_UNSTATED_TOOL_CHARS = 32_768


def _refuse_unstated_past_limit(tools: list[Any]) -> None:
    """A 400 naming the tool (a namespace's `description`, or a web search tool) with which the characters the model is
    never told pass MAX_UNSTATED_TOOL_CHARS."""
    total = 0
    for index, tool in enumerate(tools):
        if isinstance(tool, NamespaceTool):
            total, path = total + len(tool.description or ""), ("tools", index, "description")
        elif isinstance(tool, WebSearchTool):
            dumped = tool.model_dump(mode="json", exclude_none=True)
            total, path = total + len(json.dumps(dumped, separators=(",", ":"), ensure_ascii=False)), ("tools", index)
        else:
            continue
        if total > MAX_UNSTATED_TOOL_CHARS:
            raise bad_input(f"Error: at '/{'/'.join(map(str, path))}': the namespace descriptions and web search tools "
                            f"take more than {MAX_UNSTATED_TOOL_CHARS} characters in all (web search tools as compact "
                            "JSON): they are echoed and stored, but never stated to the model", param_of(path))


# `background: true` with `store: false`: the 400 `ResponsesInput._background_is_stored` answers, stated in the document.
_BACKGROUND_RULE = {"if": {"required": ["background"], "properties": {"background": {"const": True}}},
                    "then": {"properties": {"store": {"not": {"const": False}}}}}


class ResponsesInput(_Open):
    STATED_DEFAULTS: ClassVar[dict[str, Any]] = stated_defaults(WORKERS_AI_DEFAULTS)
    model_config = ConfigDict(json_schema_extra={"allOf": [_BACKGROUND_RULE]})
    # An `item_reference` is replaced by the stored item it names (`ResponseStore.expand`) before anything reads `input`.
    input: str_or_list(RequestItem)  # type: ignore[valid-type]
    instructions: str | None = None
    reasoning: Reasoning | None = None
    # After validation: the function tools the model is offered (a namespace's as NAMESPACE.FUNCTION; web search
    # left out); `sent_tools` keeps what the request sent, for the echo.
    tools: list[ResponsesTool] | None = Field(None, description=(
        f"namespace descriptions and web search tools (as compact JSON) take at most {MAX_UNSTATED_TOOL_CHARS} characters "
        "in all: echoed and stored, never stated to the model"))
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # echoed (OpenAI's default: true); the model makes one call per turn anyway
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_LIMIT)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, ge=0.001, le=1)
    text: TextConfig | None = None
    response_format: ResponseFormat | None = None  # Workers AI's JSON mode, accepted on every shape
    previous_response_id: str | None = None
    store: bool | None = None  # false: not kept for a later previous_response_id
    stream: bool = False
    lora: str | None = None
    seed: int | None = Field(None, ge=1, le=9999999999)
    options: RunOptions | None = None
    metadata: Metadata | None = None  # echoed on the response object (and so stored with it)
    # OpenAI's names: "message.output_text.logprobs" asks for the answer text's logprobs; the others name what a
    # gpt-oss server has nothing of (search results, images, encrypted reasoning) and are accepted, ignored.
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)  # alternatives per logprobs entry (with that `include`)
    max_tokens: None = _not_here(NOT_RESPONSES["max_tokens"])
    # How many items at the front of `input` came from `previous_response_id` (set by the conversation store): an
    # error names the caller's own items by their index in what it sent.
    _stored_items: int = PrivateAttr(0)
    max_completion_tokens: None = _not_here(NOT_RESPONSES["max_completion_tokens"])
    stop: None = _not_here(NOT_RESPONSES["stop"])
    logit_bias: None = _not_here(NOT_RESPONSES["logit_bias"])
    frequency_penalty: None = _not_here(NOT_RESPONSES["frequency_penalty"])
    presence_penalty: None = _not_here(NOT_RESPONSES["presence_penalty"])
    repetition_penalty: None = _not_here(NOT_RESPONSES["repetition_penalty"])
    top_k: None = _not_here(NOT_RESPONSES["top_k"])
    min_p: None = _not_here(NOT_RESPONSES["min_p"])
    n: None = _not_here(NOT_RESPONSES["n"])
    reasoning_effort: None = _not_here(NOT_RESPONSES["reasoning_effort"])
    logprobs: None = _not_here(NOT_RESPONSES["logprobs"])
    conversation: None = Field(None, description=UNSUPPORTED_RESPONSES["conversation"])
    prompt: None = Field(None, description=UNSUPPORTED_RESPONSES["prompt"])
    # OpenAI's background mode, on the OpenAI routes: the run outlives its connection (`api/background.py`) and is
    # fetched, followed or cancelled by id; without `stream` the create answers at once, `queued`, and the client polls.
    # `/ai/run` serves it as a plain request, streamed or not. Echoed.
    background: bool | None = None
    # OpenAI's: "auto" drops the conversation's oldest items when it does not fit the window with the answer's room
    # (`Service._truncated`); "disabled" (the default) keeps the 400. Echoed.
    truncation: Literal["auto", "disabled"] | None = None

    _sent_tools: list[Any] | None = PrivateAttr(None)
    _namespaced: dict[str, tuple[str, str]] = PrivateAttr(default_factory=dict)  # NAMESPACE.FUNCTION → both

    @model_validator(mode="after")
    def _offered_tools(self):
        """Namespaces' functions offered as functions named NAMESPACE.FUNCTION, web search not offered."""
        if self.tools and any(isinstance(tool, (NamespaceTool, WebSearchTool)) for tool in self.tools):
            _refuse_unstated_past_limit(self.tools)
            self._sent_tools, offered = self.tools, []
            for tool in self.tools:
                if isinstance(tool, NamespaceTool):
                    for function, spec in zip(tool.functions(), tool.tools):
                        self._namespaced[function.name] = (tool.name, tool_spec(spec).name)
                        offered.append(function)
                elif not isinstance(tool, WebSearchTool):
                    offered.append(tool)
            self.tools = offered
        return self

    @property
    def sent_tools(self) -> list[Any] | None:
        """The tools as the request sent them (namespaces and web search included)."""
        return self._sent_tools if self._sent_tools is not None else self.tools

    def called(self, name: str) -> tuple[str | None, str]:
        """(namespace, function) of a function the model called by its offered name (namespace None: a plain one)."""
        return self._namespaced.get(name, (None, name))

    @model_validator(mode="after")
    def _background_is_stored(self):
        """A background response is fetched by id, so it must be kept: with `store: false` a 400, as OpenAI answers."""
        if self.background is True and self.store is False:
            raise bad_input("Error: at '/background': background mode needs the response stored; store: false refuses "
                            "it (drop one of them)", "background")
        return self

    @field_validator(*NOT_RESPONSES, mode="before")
    @classmethod
    def _not_a_responses_parameter(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(f"{info.field_name} is not a Responses parameter: {NOT_RESPONSES[info.field_name]}")
        return value

    @field_validator(*UNSUPPORTED_RESPONSES, mode="before")
    @classmethod
    def _not_supported(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(UNSUPPORTED_RESPONSES[info.field_name])
        return value


# An item's `external_reference` is the client's opaque label, stored with the item for up to a week and echoed in every
# poll, and no token pays for it: a 9 MB one made each near-free batch 9 MB of disk (hunt round 17 A-F5). 512
# characters, as OpenAI's `metadata` values (the nearest documented limit on such a label), hold any id, key or URL
# path a client correlates results by.
MAX_EXTERNAL_REFERENCE = 512


class QueuedItem(_Open):
    """What a batch item adds to its sync shape: a reference of the caller's, echoed with the item's result."""

    external_reference: str | None = Field(None, max_length=MAX_EXTERNAL_REFERENCE)


class QueuedPrompt(QueuedItem, PromptInput):
    pass


class QueuedMessages(QueuedItem, MessagesInput):
    pass


class QueuedResponses(QueuedItem, ResponsesInput):
    pass


class BatchInput(_Open):
    # Each item is one of the sync shapes plus `external_reference`, so the document says what is queued.
    requests: list[Union[QueuedPrompt, QueuedMessages, QueuedResponses]] = Field(min_length=1)


class PollInput(_Open):
    request_id: str


TOKEN_ID_KEY = r"^[0-9]{1,10}$"
MAX_LOGIT_BIAS = 300  # OpenAI's limit


def _one_key_a_token(bias: dict[str, float]) -> dict[str, float]:
    """Two keys naming one token ("1" and "01", both the pattern's) would bias it twice, once in each direction maybe:
    a 400 naming the second key, which JSON Schema cannot state (hunt round 19 A-F1)."""
    seen: dict[int, str] = {}
    for key in bias:
        first = seen.setdefault(int(key), key)
        if first != key:
            raise refused(key, bias[key], "logit_bias_repeated", "token id {id} is biased twice: by {first} and {key} "
                          "(send each token once)", {"id": int(key), "first": repr(first), "key": repr(key)})
    return bias


# OpenAI's `logit_bias` (chat and completions): token id (a decimal string) → bias added to its logit. Not on
# Workers AI, whose schema does not list it. The document states what pydantic checks (no other keys, at most 300)
# but one: each token once, however its id is spelled (`_one_key_a_token`).
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=TOKEN_ID_KEY)], Annotated[float, Field(ge=-100, le=100)]],
    Field(max_length=MAX_LOGIT_BIAS), AfterValidator(_one_key_a_token),
    WithJsonSchema({"type": "object", "maxProperties": MAX_LOGIT_BIAS, "additionalProperties": False,
                    "patternProperties": {TOKEN_ID_KEY: {"type": "number", "minimum": -100, "maximum": 100}},
                    "description": "token id → bias in [-100, 100], added to that token's logit before sampling; each token "
                                   "once (\"1\" and \"01\" are one token)"}),
]


class OpenAISampling(_Open):
    """Sampling fields only the OpenAI surface (`/v1/chat/completions`, `/v1/completions`) takes."""

    logit_bias: LogitBias | None = None
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM's extension: keep only tokens whose probability "
                                "(after temperature) is at least min_p × the most likely token's; 0 or absent: off")


def _when(field: str, then: str) -> dict[str, Any]:
    """JSON Schema: a non-null `field` needs `then: true`."""
    return {"if": {"required": [field], "properties": {field: {"not": {"type": "null"}}}},
            "then": {"required": [then], "properties": {then: {"const": True}}}}


class _OpenAIRules(_Open):
    """Combinations OpenAI's API refuses with a 400 (a caller asking for what it would silently not get)."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_when("stream_options", "stream")]})

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise bad_input("Error: at '/stream_options': stream_options is only allowed when stream is true", "stream_options")
        return self


class ChatCompletionRequest(_OpenAIRules, MessagesInput, OpenAISampling):
    STATED_DEFAULTS: ClassVar[dict[str, Any]] = stated_defaults(OPENAI_DEFAULTS)
    model_config = ConfigDict(json_schema_extra={"allOf": [_when("stream_options", "stream"), _when("top_logprobs", "logprobs"),
                                                           _STOP_RULE]})
    model: str
    seed: OpenAISeed
    temperature: OpenAITemperature
    top_p: OpenAITopP
    top_k: VLLMTopK
    messages: list[OpenAIMessage] = Field(min_length=1)  # OpenAI's legacy `function` role too
    n: int | None = Field(None, ge=1, le=16)  # the OpenAI surface serves several choices
    # The legacy spelling of `tool_choice` (which wins when both are given), as OpenAI still takes it.
    function_call: Literal["none", "auto"] | FunctionName | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and self.logprobs is not True:
            raise bad_input("Error: at '/top_logprobs': logprobs must be true when top_logprobs is set", "top_logprobs")
        return self


class ResponsesRequest(ResponsesInput):
    STATED_DEFAULTS: ClassVar[dict[str, Any]] = stated_defaults(OPENAI_DEFAULTS)
    model: str
    seed: OpenAISeed
    temperature: OpenAITemperature
    top_p: OpenAITopP

    @model_validator(mode="before")
    @classmethod
    def _input_may_be_left_out(cls, data: Any) -> Any:
        """`input` left out (or null) is no new item, as OpenAI takes it: `previous_response_id` alone continues a
        conversation (a response cut by `max_output_tokens`), `instructions` alone are answered. (`/ai/run` picks the
        Responses shape by its `input` key: there it stays required.)"""
        if isinstance(data, dict) and data.get("input") is None:
            data = {**data, "input": []}
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        body = handler.resolve_ref_schema(schema)
        body["properties"]["input"] = {"anyOf": [body["properties"]["input"], {"type": "null"}]}
        body["required"] = [k for k in body.get("required", []) if k != "input"]
        return schema


class InputTokensRequest(ResponsesRequest):
    """`POST /v1/responses/input_tokens`: what the count reads of a Responses body, `model` (the served model) and
    `input` optional, as OpenAI's endpoint takes them. The rest (`stream`, `background`, `store`, sampling…) changes no input
    token, so it is dropped unread, as any field a body's shape does not name is ignored: the document offers only
    these fields and the server refuses none it leaves out, so the two agree both ways."""

    COUNTED: ClassVar[tuple[str, ...]] = ("model", "input", "instructions", "reasoning", "tools", "tool_choice", "text",
                                          "response_format", "previous_response_id", "truncation", "max_output_tokens")
    model_config = ConfigDict(json_schema_extra=None)  # `background` and `store` are not read here: nor is their rule
    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _only_what_is_counted(cls, data: Any) -> Any:
        """`input` may be left out as on create (`ResponsesRequest`): a `previous_response_id` conversation or
        `instructions` alone is counted as it would be read with no new item."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if k in cls.COUNTED}

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        body = handler.resolve_ref_schema(schema)
        body["properties"] = {k: v for k, v in body.get("properties", {}).items() if k in cls.COUNTED}
        body["required"] = [k for k in body.get("required", []) if k in cls.COUNTED]
        return schema


MAX_PROMPTS = 16


# `echo: true` with `logprobs`: the 400 `ask.from_completion` answers (no prompt logprobs here), stated in the document.
_ECHO_RULE = {"if": {"required": ["echo"], "properties": {"echo": {"const": True}}},
              "then": {"properties": {"logprobs": {"type": "null"}}}}


# What `/v1/completions` refuses by name (null accepted), each of which the caller would believe served. `suffix`
# (insertion, which vLLM refuses too); chat's `top_logprobs`, which OpenAI's legacy completions do not have (its
# `logprobs: N` is the top N): accepted, it was dropped, a client porting chat code getting no alternatives (hunt round
# 19 A-F2).
NOT_COMPLETIONS = {"suffix": "not supported: gpt-oss does not insert text before a suffix",
                   "top_logprobs": "chat's parameter: legacy completions take logprobs: N (0..5), the N most likely tokens at "
                                   "each position"}


class CompletionRequest(_OpenAIRules, Sampling, OpenAISampling):
    STATED_DEFAULTS: ClassVar[dict[str, Any]] = stated_defaults(OPENAI_DEFAULTS)
    model_config = ConfigDict(json_schema_extra={"allOf": [_when("stream_options", "stream"),
                                                           {"properties": {"response_format": _FREE_TEXT}}, _ECHO_RULE]})
    model: str
    seed: OpenAISeed
    temperature: OpenAITemperature
    top_p: OpenAITopP
    top_k: VLLMTopK
    n: int | None = Field(None, ge=1, le=16)
    logprobs: int | None = Field(None, ge=0, le=5)  # legacy completions: how many top alternatives per token
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"one prompt, or up to {MAX_PROMPTS} (each answered by its own n choices); text only, not token ids")

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(item, (int, list)) and not isinstance(item, bool) for item in value):
            raise ValueError("token ids are not accepted here: send the prompt as text (a string or a list of strings)")
        return value

    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=1, description="1 only: best_of is not implemented (ask for n choices and pick)")

    @field_validator("best_of", mode="before")
    @classmethod
    def _no_best_of(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:  # vLLM refuses it too
            raise ValueError("best_of is not supported: ask for n choices (each is generated and billed) and pick among them")
        return value

    suffix: None = Field(None, description=NOT_COMPLETIONS["suffix"])
    top_logprobs: None = Field(None, description=NOT_COMPLETIONS["top_logprobs"])

    @field_validator(*NOT_COMPLETIONS, mode="before")
    @classmethod
    def _not_a_completions_parameter(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(f"{info.field_name} is {NOT_COMPLETIONS[info.field_name]}")
        return value


class FinetuneCreate(_Open):
    model: str
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                      description="1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    description: str | None = Field(None, max_length=MAX_DESCRIPTION, description=(
        f"free text of at most {MAX_DESCRIPTION} characters: stored and answered in every listing"))
    public: bool = False


SHAPES: dict[str, tuple[type[BaseModel], str]] = {
    "prompt": (PromptInput, "prompt"),
    "messages": (MessagesInput, "messages"),
    "responses": (ResponsesInput, "input"),
}
# The key each branch of `/ai/run`'s body requires (the document's oneOf: the three shapes, a batch, a poll): a body
# carries exactly one. `request_id` beside a prompt ran the prompt where the client expected a poll (hunt round 18 C-F2).
RUN_KEYS: dict[str, str] = {**{name: key for name, (_, key) in SHAPES.items()}, "batch": "requests", "poll": "request_id"}


def _pointer(loc: tuple) -> str:
    return "/" + "/".join(str(part) for part in loc)


# What pydantic adds to an error's location that is no field of the body: a union member's label, which is its type
# (`str`, `list[TextPart]`, `constrained-str` for `Annotated[str, Field(min_length=1)]`, `function-after[...]`, a
# model's name) or a tagged union's tag. The first part is always a field (`model` is one).
_TYPE_LABEL = re.compile(r".*\[.*|[A-Z].*|str|list|dict|int|float|bool|none|union_tag|lax-or-strict|json-or-python|tagged-union"
                         r"|(constrained|function|is|definition)-[a-z-]+")


# The most characters of one part of an error's location (a key of the body's) that the error repeats: a metadata key
# of megabytes is named by its start.
MAX_LOC_PART = 64


def _field_loc(loc: tuple) -> tuple:
    """An error's location without pydantic's union labels and tags: the field as the body spells it, a long key cut."""
    parts = (p for p in loc[1:] if not (isinstance(p, str) and _TYPE_LABEL.fullmatch(p)))
    return loc[:1] + tuple(p[:MAX_LOC_PART] + "…" if isinstance(p, str) and len(p) > MAX_LOC_PART else p for p in parts)


def describe(error: ValidationError) -> str:
    """Pydantic's errors as JSON-pointer sentences, like the hosted validator's."""
    return "Error: " + "; ".join(f"at '{_pointer(_field_loc(item['loc']))}': {item['msg']}" for item in error.errors()[:5])


def param(error: ValidationError) -> str | None:
    """OpenAI's `param` for the first error: the field as OpenAI spells it (`max_tokens`, `messages[0].content`)."""
    return param_of(_field_loc(error.errors()[0]["loc"])) if error.errors() else None


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise bad_input(describe(exc), param(exc)) from None


def classify(body: Any) -> tuple[str, BaseModel]:
    """Which `/ai/run` shape this body is → (shape name, validated model). Exactly one must match."""
    name = branch_of(body, {name: key for name, (_, key) in SHAPES.items()})
    return name, parse(SHAPES[name][0], body)


def branch_of(body: Any, keys: dict[str, str]) -> str:
    """The one branch of a oneOf whose branches each require a key (`keys`: branch → key) the body is, as the hosted
    validator words a refusal: none or several match. A key whose value is null counts as absent: no branch's key
    may be null (a prompt is a string, messages a list...), so that branch fails whatever else the body holds."""
    if not isinstance(body, dict):
        raise bad_input("Error: type at '/' must be object")
    present = [name for name, key in keys.items() if body.get(key) is not None]
    if len(present) != 1:
        matches = "0 matches" if not present else f"{len(present)} matches ({', '.join(present)})"
        expected = "; ".join(f"required properties at '/' are '{key}'" for key in keys.values())
        raise ApiError(400, 5006, f"AiError: Bad input: Error: oneOf at '/' not met, {matches}: {expected}")
    return present[0]


def one_of(branches: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """One JSON Schema `oneOf` over models, each branch a `$ref` titled by its key, every definition hoisted to the root.

    (Each model's own schema carries its `$defs` but refers to them as `#/$defs/…`, which resolves against the
    document's root: nested as branches, the refs would point nowhere.) One generator names the definitions,
    so a name means one model across the branches.
    """
    refs, top = models_json_schema([(m, "validation") for m in branches.values()], ref_template="#/$defs/{model}")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "oneOf": [{"title": title, **refs[(m, "validation")]} for title, m in branches.items()], "$defs": top.get("$defs", {})}


def input_schema() -> dict[str, Any]:
    """The `/ai/run` input as one JSON Schema `oneOf` (for `ai/models/schema`): the three shapes and a batch."""
    return one_of({"Prompt": PromptInput, "Messages": MessagesInput, "Responses": ResponsesInput, "Batch": BatchInput})


def output_schema() -> dict[str, Any]:
    """A sync `/ai/run` result, per shape (for `ai/models/schema`): the models the OpenAPI document states results with."""
    return one_of({"Prompt": PromptResult, "Messages": ChatCompletion, "Responses": ResponseObject})


def body_schema(*models: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that parses its own body: the body's schema by reference."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


DOCUMENTED = (PromptInput, MessagesInput, ResponsesInput, BatchInput, PollInput, ChatCompletionRequest, ResponsesRequest,
              InputTokensRequest, CompletionRequest, FinetuneCreate)


def openapi_components() -> dict[str, Any]:
    """JSON schemas of every documented body, with refs into `#/components/schemas`."""
    _, top = models_json_schema([(m, "validation") for m in DOCUMENTED], ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})
