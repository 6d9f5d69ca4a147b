"""The conversation shapes harmony renders, as pydantic models: Chat Completions messages, Responses
input items, function tools. The API's request schemas (`api/schemas.py`) are built from these, so a
body is parsed once at the edge and the same typed objects reach the renderer.

Extra fields are accepted (clients send more than the schema names); known fields are checked
strictly, like the hosted JSON Schema validator: "0.5" is no number and 1 is no boolean.

Unions pick their branch from the value (a list or not; a part's or an item's `type`), so a refused value gets
the one error of the branch it meant, never every branch's (`Input should be a valid string` for a content list
holding an image); a part, item or tool of a type gpt-oss cannot take is refused by name.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError


class Shape(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type", "object") != "object":
        raise PydanticCustomError("object_schema", "a function's parameters must be a JSON Schema of type 'object' "
                                  "(arguments are a JSON object), not {type}", {"type": repr(schema["type"])})
    return schema


# As OpenAI requires: the arguments of a call are a JSON object, so its schema describes one (`{}`: any object).
ObjectSchema = Annotated[dict[str, Any], AfterValidator(_object_schema),
                         WithJsonSchema({"type": "object", "properties": {"type": {"const": "object"}}})]


# What the harmony header `to=functions.NAME` can carry (and the tool grammar spells): OpenAI's `[a-zA-Z0-9_-]{1,64}`,
# widened to the dots and colons of namespaced (MCP-style) names. In the shape, so a bad name is a 400 naming the
# field whatever `tool_choice` says, and the OpenAPI document states it.
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"


class FunctionDef(Shape):
    type: Literal["function"] | None = None  # the Responses API's flat spelling carries it
    name: str = Field(min_length=1, pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: ObjectSchema | None = None
    strict: bool | None = None


class WrappedTool(Shape):
    type: Literal["function"]
    function: FunctionDef


class FlatTool(FunctionDef):
    """A tool in the flat spelling (Responses, Workers AI). One with a `function` key is a `WrappedTool`, which
    the document says too, so the two branches never both match."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["function"]}})


def refused(field: str, value: Any, kind: str, message: str, context: dict[str, Any]) -> ValidationError:
    """One error at `field` inside the value being validated (`tools[0].type`), for a before-validator to raise:
    the one reason, where a union would list every branch's complaint."""
    return ValidationError.from_exception_data(kind, [InitErrorDetails(
        type=PydanticCustomError(kind, message, context), loc=(field,), input=value)])


def function_or_flat(value: Any, thing: str, only: str, spellings: str) -> Any:
    """A tool (or a tool_choice object) of a type other than `function` is refused by name (`only`: what is
    supported), as is one without the `function` object or flat `name` that says which function it is (`spellings`)."""
    if not isinstance(value, dict):
        return value
    if value.get("type") not in (None, "function"):
        raise refused("type", value["type"], f"{thing}_type", "{thing} type {type} is not supported: {only}",
                      {"thing": thing, "type": repr(value["type"]), "only": only})
    if "function" not in value and "name" not in value:
        raise PydanticCustomError("function_name", "a function {thing} needs the function's name: {spellings}",
                                  {"thing": thing, "spellings": spellings})
    return value


def _tool_model(tool: Any) -> str:
    """The branch a tool is validated as: `WrappedTool` when it has a `function` (chat's spelling), else flat."""
    wrapped = isinstance(tool, WrappedTool) or isinstance(tool, dict) and "function" in tool
    return "WrappedTool" if wrapped else "FlatTool"


def _function_tool(tool: Any) -> Any:
    """`file_search`, `code_interpreter`, `custom`, …: one error naming the type, not every branch's."""
    return function_or_flat(tool, "tool", "only function tools (type 'function') can be called here, not built-in tools "
                            "(file_search, code_interpreter, custom, …; /v1/responses also takes namespaces of function "
                            "tools, and web_search, which the model is not offered: it has no search here)",
                            "{'type': 'function', 'function': {'name': …}} or, flat, {'type': 'function', 'name': …}")


Tool = Annotated[Union[Annotated[WrappedTool, Tag("WrappedTool")], Annotated[FlatTool, Tag("FlatTool")]],
                 Discriminator(_tool_model), BeforeValidator(_function_tool)]


def tool_spec(tool: WrappedTool | FlatTool) -> FunctionDef:
    """The function a tool offers, whichever spelling it came in."""
    return tool.function if isinstance(tool, WrappedTool) else tool


# A namespace's name: the part before the dot of the tool names it gives its functions (so no dot of its own).
NAMESPACE_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"


class NamespaceTool(Shape):
    """OpenAI's Responses tool that groups function tools under a name (Codex's `multi_agent_v1`, sent by default).
    The model is offered each as a function named NAMESPACE.FUNCTION (a dotted name, as harmony's own tool namespaces
    are written), and a call of one comes back as a `function_call` item with `namespace` and the function's own
    name, as OpenAI returns it."""

    type: Literal["namespace"]
    name: str = Field(pattern=NAMESPACE_PATTERN)
    description: str | None = None
    tools: list[Tool] = Field(min_length=1)

    def functions(self) -> list[FlatTool]:
        return [FlatTool(type="function", name=f"{self.name}.{spec.name}", description=spec.description,
                         parameters=spec.parameters, strict=spec.strict) for spec in map(tool_spec, self.tools)]


# OpenAI's web search tool types. gpt-oss has no search backend here: the tool is accepted and not offered to the
# model, which answers from what it knows, as it would had it not searched (agents such as Codex send one by default;
# a 400 would end every turn). Forcing it (`tool_choice`) stays a 400: that cannot be honoured.
WEB_SEARCH_TYPES = ("web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11")


class WebSearchTool(Shape):
    type: Literal[WEB_SEARCH_TYPES]  # type: ignore[valid-type]


def _responses_tool_model(tool: Any) -> str:
    kind = tool.type if isinstance(tool, (NamespaceTool, WebSearchTool)) else tool.get("type") if isinstance(tool, dict) else None
    return "NamespaceTool" if kind == "namespace" else "WebSearchTool" if kind in WEB_SEARCH_TYPES else "Tool"


# A Responses request's tools: function tools, namespaces of them, and web search (accepted, not offered). The tags
# are capitalised, as pydantic's own labels are, so an error's path leaves them out (`tools[0].name`).
ResponsesTool = Annotated[Union[Annotated[Tool, Tag("Tool")], Annotated[NamespaceTool, Tag("NamespaceTool")],
                                Annotated[WebSearchTool, Tag("WebSearchTool")]], Discriminator(_responses_tool_model)]


class ToolCallFunction(Shape):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCall(Shape):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


def str_or_list(item: Any) -> Any:
    """`str | list[item]`, validated as the branch the value's JSON type picks (see the module's docstring).
    The tags are pydantic's own labels for these types, which error paths already leave out."""
    return Annotated[Union[Annotated[str, Tag("str")], Annotated[list[item], Tag("list")]],  # type: ignore[valid-type]
                     Discriminator(lambda value: "list" if isinstance(value, list) else "str")]


TEXT_PART_TYPES = ("text", "input_text", "output_text")
PART_TYPES = (*TEXT_PART_TYPES, "refusal")


def _text_only(part: Any) -> Any:
    """A content part of a type gpt-oss cannot read (`image_url`, `input_image`, `input_audio`, `file`, …) is
    refused by name, before the union would list what each of its branches wanted."""
    if isinstance(part, dict) and part.get("type") not in PART_TYPES:
        if "type" not in part:
            raise PydanticCustomError("part_type", "a content part needs a 'type': {types}", {"types": _or(PART_TYPES)})
        raise PydanticCustomError("part_type", "content part type {type} is not supported: gpt-oss takes text only "
                                  "(parts of type {types})", {"type": repr(part["type"]), "types": _or(PART_TYPES)})
    return part


def _or(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1]


class TextPart(Shape):
    type: Literal["text", "input_text", "output_text"]
    text: str


class RefusalPart(Shape):
    """An assistant turn that declined (OpenAI's chat and Responses spell it as a part): its text is the answer."""

    type: Literal["refusal"]
    refusal: str


Part = Annotated[Union[TextPart, RefusalPart], Field(discriminator="type"), BeforeValidator(_text_only)]
Content = Union[str_or_list(Part), None]


# Roles whose message must carry `content` (OpenAI's rule, and the hosted schema's): only an assistant turn may leave it
# out (its tool calls, or its reasoning alone, are the turn).
_CONTENT_REQUIRED = ("system", "developer", "user", "tool", "function")
_CONTENT_RULE = {"if": {"required": ["role"], "properties": {"role": {"enum": list(_CONTENT_REQUIRED)}}},
                 "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}}


class Message(Shape):
    model_config = ConfigDict(json_schema_extra={"allOf": [_CONTENT_RULE]})
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an assistant turn's reasoning, as vLLM and DeepSeek spell it
    reasoning: str | None = None  # ... and as OpenRouter does
    function_call: ToolCallFunction | None = None  # the legacy single call
    # An assistant turn that declined, as OpenAI answers it (`content` null): its text is the answer, as a refusal part's.
    refusal: str | None = None

    @model_validator(mode="after")
    def _content_is_given(self) -> "Message":
        """A user, system, developer or tool message without its text was answered as an empty turn (a tool message as an
        invented result): a client's bug billed as an answer. OpenAI and the hosted schema refuse it."""
        if self.content is None and self.role in _CONTENT_REQUIRED:
            raise PydanticCustomError("missing_content", "a '{role}' message needs its 'content' (only an assistant turn may "
                                      "leave it out)", {"role": self.role})
        return self


class OpenAIMessage(Message):
    """A `/v1/chat/completions` message: the five roles, plus OpenAI's legacy `function` role, which carries the
    result of a legacy `function_call` back (deprecated on OpenAI, still accepted). Without it a legacy client's round
    trip stops after the first call. It is answered by `name` (legacy calls have no id), as a tool message without
    `tool_call_id` is. Workers AI's spec lists five roles, and `/ai/run` never answers with a `function_call`, so its
    Messages shape keeps `Message`."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_CONTENT_RULE, {
        "if": {"required": ["role"], "properties": {"role": {"const": "function"}}},
        "then": {"required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}}}]})
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]

    @model_validator(mode="after")
    def _function_result_is_named(self) -> "OpenAIMessage":
        if self.role == "function" and not self.name:  # OpenAI requires it: the name is all that says which call it answers
            raise PydanticCustomError("function_name", "a 'function' message needs the 'name' of the function whose result it is")
        return self


class InputMessage(Shape):
    """A Responses message item; without `role` it is the user's (as a bare string input is)."""

    # `{"id": …}` with no `type`, `role` or `content` is an item reference (`item_union`), not a message.
    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": [key]} for key in ("type", "role", "content")]
                              + [{"not": {"required": ["id"]}}]})
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"] = "user"
    content: Content = None
    # OpenAI's label of an assistant message: `commentary` (a preamble, harmony's commentary channel, before the turn's
    # tool calls) or `final_answer`. ossrun's output messages carry it; without it a message is commentary when a
    # function_call of its turn follows it (`harmony.inputs`).
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallInput(Shape):
    type: Literal["function_call"]
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] | None = None
    # The id its function_call_output names (OpenAI requires it): without one, no output could answer the call.
    call_id: str
    namespace: str | None = None  # a function of a namespace tool (`NamespaceTool`): the model called NAMESPACE.NAME
    # `incomplete`: cut while its arguments were written (max_output_tokens, a cancel, a failure). Never made, so it
    # needs no output: unanswered, it is left out of the prompt (`harmony.inputs`).
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @property
    def called(self) -> str:
        """The function's name as the model wrote it."""
        return f"{self.namespace}.{self.name}" if self.namespace else self.name


class FunctionCallOutputInput(Shape):
    type: Literal["function_call_output"]
    call_id: str = Field(description="The call_id of an earlier function_call item")
    output: Any = None


class ReasoningPart(Shape):
    type: str | None = None
    text: str = ""


# Responses' `encrypted_content` of a reasoning item (`include: ["reasoning.encrypted_content"]`): what lets a client
# that keeps nothing on the server (`store: false`) send the reasoning back with the tool result that followed it. Not
# encrypted: ossrun shows the reasoning in clear anyway; it is the text, encoded, so that it round-trips unchanged.
_SEALED = "ossrun-reasoning-v1:"
# What seal_reasoning makes (url-safe base64 behind the prefix), stated in the shape so the OpenAPI document refuses
# exactly what the server refuses.
SEALED_PATTERN = "^" + _SEALED + r"(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}==|[A-Za-z0-9_-]{3}=)?$"


def seal_reasoning(text: str) -> str:
    return _SEALED + base64.urlsafe_b64encode(text.encode()).decode()


def open_reasoning(sealed: str) -> str:
    """The reasoning text of an `encrypted_content` matching SEALED_PATTERN (the shape checked it)."""
    return base64.urlsafe_b64decode(sealed[len(_SEALED):].encode()).decode(errors="replace")


class ReasoningInput(Shape):
    type: Literal["reasoning"]
    content: list[ReasoningPart] | None = None
    # Read when `content` is absent; one this server did not make (OpenAI's, say) is refused by the pattern.
    encrypted_content: str | None = Field(None, pattern=SEALED_PATTERN, description=(
        "an ossrun reasoning item's encrypted_content (from include: ['reasoning.encrypted_content'])"))
    # Read when both are absent: with `reasoning.summary` asked, ossrun's summary is the reasoning text itself, and the
    # AI SDK's `openai()` with `store: false` sends a reasoning item back with its summary alone.
    summary: list[ReasoningPart] | None = None

    @property
    def text(self) -> str:
        if self.content:
            return "".join(part.text for part in self.content)
        if self.encrypted_content:
            return open_reasoning(self.encrypted_content)
        return "".join(part.text for part in self.summary or ())


ITEM_TYPES = {"message": InputMessage, "function_call": FunctionCallInput, "function_call_output": FunctionCallOutputInput,
              "reasoning": ReasoningInput}


class ItemReference(Shape):
    """OpenAI's `item_reference`: an item of a stored response named by its id, in place of the item itself (the AI
    SDK's `openai()` sends one for each earlier output item, as `store` is true by default). Never rendered: the API
    puts the stored item in its place (`api/conversations.py`) before harmony reads the input."""

    # OpenAI's `ItemReferenceParam` has `type` optional: `{"id": …}` alone (no `role`, no `content`) is a reference.
    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["type"]}, {"not": {"anyOf": [
        {"required": ["role"]}, {"required": ["content"]}]}}]})
    type: Literal["item_reference"] = "item_reference"
    id: str


def _kind(item: dict[str, Any], types: dict[str, type[Shape]]) -> Any:
    """The type an input item names; without one, a message, unless references are taken and it is `{"id": …}` with
    neither `role` nor `content` (OpenAI's type-less reference, which would otherwise read as an empty user message)."""
    if "type" in item:
        return item["type"]
    bare_reference = "item_reference" in types and "id" in item and "role" not in item and "content" not in item
    return "item_reference" if bare_reference else "message"


def item_union(types: dict[str, type[Shape]]) -> Any:
    """An input item of one of `types` (the branch its `type` names; none: a message, or a bare reference), any other type refused by name
    (`web_search_call`, …) with one error, where the union would list what each branch wanted."""

    def known(item: Any) -> Any:
        if not isinstance(item, dict):
            return item
        kind = _kind(item, types)
        message = "input item type {type} is not supported: items are {types}"
        context = {"type": repr(kind), "types": _or(tuple(types))}
        if not isinstance(kind, str):  # a list or an object (unhashable: a 500 once), refused at the field itself
            raise refused("type", kind, "item_type", message, context)
        if kind not in types:
            raise PydanticCustomError("item_type", message, context)
        return item

    def model(item: Any) -> str:  # named as pydantic labels a union's models (which error paths leave out)
        kind = _kind(item, types) if isinstance(item, dict) else getattr(item, "type", "message")
        return types.get(kind if isinstance(kind, str) else "message", InputMessage).__name__

    return Annotated[Union[tuple(Annotated[m, Tag(m.__name__)] for m in types.values())],  # type: ignore[misc]
                     Discriminator(model), BeforeValidator(known)]


# What harmony renders, and what a request may send: the items, or a reference to a stored one.
InputItem = item_union(ITEM_TYPES)
RequestItem = item_union({**ITEM_TYPES, "item_reference": ItemReference})
