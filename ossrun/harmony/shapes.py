"""The conversation shapes harmony renders, as pydantic models: Chat Completions messages, Responses
input items, function tools. The API's request schemas (`api/schemas.py`) are built from these, so a
body is parsed once at the edge and the same typed objects reach the renderer.

Extra fields are accepted (clients send more than the schema names); known fields are checked
strictly, like the hosted JSON Schema validator: "0.5" is no number and 1 is no boolean.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema


class Shape(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type", "object") != "object":
        raise ValueError(f"a function's parameters must be a JSON Schema of type 'object' (arguments are a JSON object), "
                         f"not {schema['type']!r}")
    return schema


# As OpenAI requires: the arguments of a call are a JSON object, so its schema describes one (`{}`: any object).
ObjectSchema = Annotated[dict[str, Any], AfterValidator(_object_schema),
                         WithJsonSchema({"type": "object", "properties": {"type": {"const": "object"}}})]


class FunctionDef(Shape):
    type: Literal["function"] | None = None  # the Responses API's flat spelling carries it
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: ObjectSchema | None = None
    strict: bool | None = None


class WrappedTool(Shape):
    type: Literal["function"]
    function: FunctionDef


Tool = Union[WrappedTool, FunctionDef]


class ToolCallFunction(Shape):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCall(Shape):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(Shape):
    type: Literal["text", "input_text", "output_text"]
    text: str


Content = Union[str, list[TextPart], None]


class Message(Shape):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an assistant turn's reasoning, as vLLM and DeepSeek spell it
    reasoning: str | None = None  # ... and as OpenRouter does
    function_call: ToolCallFunction | None = None  # the legacy single call


class InputMessage(Shape):
    """A Responses message item; without `role` it is the user's (as a bare string input is)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"] = "user"
    content: Content = None


class FunctionCallInput(Shape):
    type: Literal["function_call"]
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] | None = None
    call_id: str | None = None


class FunctionCallOutputInput(Shape):
    type: Literal["function_call_output"]
    call_id: str = Field(description="The call_id of an earlier function_call item")
    output: Any = None


class ReasoningPart(Shape):
    type: str | None = None
    text: str = ""


class ReasoningInput(Shape):
    type: Literal["reasoning"]
    content: list[ReasoningPart] | None = None


InputItem = Union[InputMessage, FunctionCallInput, FunctionCallOutputInput, ReasoningInput]
