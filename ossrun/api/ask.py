"""One generation request as the service needs it, whichever surface it came in on.

Each surface parses its body once into its pydantic model (`schemas.py`) and maps that model onto an
`Ask` here; nothing below reads the body again. The mapping is where the surfaces differ: the field
that holds the output budget, where the JSON format is named, what `logprobs` means.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ossrun.api import schemas
from ossrun.api.errors import bad_input
from ossrun.harmony.shapes import InputItem, Message, NamespaceTool, Tool, WebSearchTool, WrappedTool, tool_spec


@dataclass(frozen=True, slots=True)
class FinalFormat:
    """What the answer must be: free text, any JSON object (`schema` None), or JSON valid against `schema`."""

    schema: dict[str, Any] | None = None
    structured: bool = False
    strict: bool = False  # OpenAI's `strict` (absent: false): only a strict schema is refused for keywords not implemented
    name: str | None = None  # the format's name and description, stated to the model with the schema
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Ask:
    shape: str  # prompt | messages | responses | completions
    messages: Sequence[Message] | None = None  # Chat
    items: str | Sequence[InputItem] | None = None  # Responses
    stored_items: int = 0  # Responses: how many of `items` came from previous_response_id (in front)
    truncate: bool = False  # Responses' `truncation: "auto"`: the oldest items may go to fit the window
    instructions: str | None = None
    prompt: str | None = None  # the Prompt shape's text, or the raw text (`raw`, /v1/completions)
    raw: bool = False
    tools: Sequence[Tool] = ()  # shown to the model whatever tool_choice says ("none": the grammar refuses a call)
    tool_choice: str = "auto"  # auto | required | none
    named_tool: str | None = None  # a tool_choice naming one function
    allowed: tuple[str, ...] | None = None  # `allowed_tools`: the only tools that may be called (None: any of `tools`)
    legacy_functions: bool = False  # /v1 chat offered `functions` (no `tools`): its call is answered as `function_call`
    effort: str | None = None
    final: FinalFormat = field(default_factory=FinalFormat)
    max_tokens: int | None = None
    max_tokens_name: str = "max_tokens"  # the field it came in (`max_completion_tokens`, Responses' `max_output_tokens`)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None  # /v1 only (vLLM's extension)
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); ids not yet checked against the vocabulary
    echo: bool = False  # /v1/completions: the prompt's text before each choice's
    n: int = 1
    lora: str | None = None
    stream: bool = False
    include_usage: bool = False
    reject_if_busy: bool = False
    source: schemas.ResponsesInput | None = None  # a Responses request: its object echoes some fields, `store` keeps it

    @property
    def limit_name(self) -> str | None:
        """The field that set the answer's limit, for an error to name; None when the caller set none."""
        return None if self.max_tokens is None else self.max_tokens_name

    @property
    def format_name(self) -> str:
        """The field that set the answer's JSON format, for an error to name (Responses' `text.format`)."""
        responses = isinstance(self.source, schemas.ResponsesInput)
        return "text.format" if responses and self.source.response_format is None else "response_format"

    def parameters_name(self, tool: str) -> str | None:
        """The field holding the parameters of the tool offered as `tool`, as the body spells it, for an error to name:
        `tools[0].function.parameters`, the flat `tools[0].parameters`, a namespace's `tools[0].tools[1].parameters`,
        the legacy `functions[0].parameters`."""
        return next((f"{where}.parameters" for name, where in _tool_fields(self.source) if name == tool), None)

    @property
    def store(self) -> bool:
        """Keep the finished response for `previous_response_id` (Responses' `store`, true unless false)."""
        return self.source is not None and self.source.store is not False

    @property
    def background(self) -> bool:
        """Responses' `background: true`: the run outlives its connection (`api/background.py`)."""
        return isinstance(self.source, schemas.ResponsesInput) and self.source.background is True  # chat keeps its body here too


def _tool_fields(body: Any) -> Iterator[tuple[str, str]]:
    """(the name the model is offered it by, where the body holds it) of each function tool a body sent."""
    sent = body.sent_tools if isinstance(body, schemas.ResponsesInput) else getattr(body, "tools", None)
    for key, tools in (("tools", sent), ("functions", getattr(body, "functions", None))):
        for i, tool in enumerate(tools or ()):
            if isinstance(tool, NamespaceTool):
                for j, spec in enumerate(tool.tools):
                    yield f"{tool.name}.{tool_spec(spec).name}", f"{key}[{i}].tools[{j}]" + _wrapped(spec)
            elif not isinstance(tool, WebSearchTool):
                yield tool_spec(tool).name, f"{key}[{i}]" + _wrapped(tool)


def _wrapped(tool: Any) -> str:
    return ".function" if isinstance(tool, WrappedTool) else ""


def final_format(fmt: schemas.ResponseFormat | None) -> FinalFormat:
    """`response_format` (any shape) or Responses `text.format`.

    `json_schema` comes in three spellings, all accepted: OpenAI chat's `{"json_schema": {"name", "schema"}}`,
    Responses' flat `{"name", "schema"}`, and Workers AI's `{"json_schema": <the schema itself>}` (one without a
    `schema` key: `schemas.ResponseFormat` refuses a wrapper with other keys, a non-object schema, a `name`,
    `description` or `strict` of another type, and one of only those keys, which lacks its schema).
    `json_object`: any JSON object. `text` or absent: free text."""
    if fmt is None or fmt.type == "text":
        return FinalFormat()
    if fmt.type == "json_object":
        return FinalFormat(None, True)
    if fmt.schema_ is not None:  # Responses
        return FinalFormat(fmt.schema_, True, fmt.strict is True, _text(fmt.name), _text(fmt.description))
    wrapper = fmt.json_schema
    if wrapper is not None and "schema" in wrapper:  # OpenAI's wrapper (its keys and `schema` checked by the model)
        return FinalFormat(wrapper["schema"], True, wrapper.get("strict") is True, _text(wrapper.get("name")),
                           _text(wrapper.get("description")))
    if wrapper is not None:  # Workers AI: the schema itself
        return FinalFormat(wrapper, True)
    raise bad_input("Error: at '/response_format/json_schema': a JSON Schema object is required", "response_format")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _choice(choice: schemas.ToolChoice | schemas.FunctionName | None) -> dict[str, Any]:
    """The `Ask` fields of a `tool_choice` in any spelling, or of a legacy `function_call`: its mode, the function it
    names, the tools `allowed_tools` lets the model call."""
    if choice is None:
        return dict(tool_choice="auto")
    if isinstance(choice, str):
        return dict(tool_choice=choice)
    if isinstance(choice, (schemas.AllowedToolsChoice, schemas.FlatAllowedToolsChoice)):
        allowed = choice.allowed_tools if isinstance(choice, schemas.AllowedToolsChoice) else choice
        return dict(tool_choice=allowed.mode, allowed=allowed.names())
    return dict(tool_choice="auto", named_tool=choice.function.name if isinstance(choice, schemas.NamedToolChoice) else choice.name)


def _sampling(m: schemas.Sampling) -> dict[str, Any]:
    """The fields every Sampling-based shape (Prompt, Messages, /v1 chat and completions) shares."""
    stop = () if m.stop is None else ((m.stop,) if isinstance(m.stop, str) else tuple(m.stop))
    max_tokens = m.max_completion_tokens if m.max_completion_tokens is not None else m.max_tokens
    name = "max_completion_tokens" if m.max_completion_tokens is not None else "max_tokens"
    return dict(max_tokens=max_tokens, max_tokens_name=name, temperature=m.temperature, top_p=m.top_p, top_k=m.top_k, seed=m.seed,
                repetition_penalty=m.repetition_penalty, frequency_penalty=m.frequency_penalty, presence_penalty=m.presence_penalty,
                stop=stop, n=m.n or 1, lora=m.lora, stream=m.stream, effort=m.reasoning_effort,
                include_usage=bool(m.stream_options and m.stream_options.include_usage),
                reject_if_busy=bool(m.options and m.options.rejectIfBusy), source=m, logit_bias=_logit_bias(m),
                min_p=m.min_p if isinstance(m, schemas.OpenAISampling) else None)


def _logit_bias(m: schemas.Sampling) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias` (only its bodies have it) as (token id, bias) pairs; the schema checked keys and values."""
    bias = m.logit_bias if isinstance(m, schemas.OpenAISampling) else None
    return tuple((int(token), float(value)) for token, value in (bias or {}).items())


def _refuse_unhonoured(fields: dict[str, bool], why: str) -> None:
    """A 400 naming the first field a prompt sent as is cannot honour (`fields`: name → whether it asks for
    something); `why` says so, `{field}` standing for the field's name."""
    field_name = next((name for name, asks in fields.items() if asks), None)
    if field_name is not None:
        raise bad_input(f"Error: at '/{field_name}': " + why.format(field=field_name), field_name)


def _structured(fmt: schemas.ResponseFormat | None) -> bool:
    return fmt is not None and fmt.type != "text"


def _refuse_stop_with_json(m: schemas.Sampling) -> None:
    """A stop string matched inside a JSON answer would end it as invalid JSON reported as `stop` (a complete answer):
    the format promises JSON that parses, so the two together are a 400 naming `stop`, as the document states."""
    _refuse_unhonoured({"stop": bool(m.stop) and _structured(m.response_format)},
                       "a JSON response_format promises an answer that parses, and a {field} string would cut it "
                       "(leave {field} out, or ask for text)")


def from_prompt(m: schemas.PromptInput) -> Ask:
    if m.raw:
        # Nothing renders the tools or the format into a raw prompt, and the grammars of JSON answers and tool calls
        # start at `<|start|>assistant`, where a raw prompt need not stop: refused, not silently free text.
        _refuse_unhonoured({"response_format": _structured(m.response_format), "tools": bool(m.tools),
                            "functions": bool(m.functions), "tool_choice": m.tool_choice not in (None, "none", "auto")},
                           "a raw prompt goes to the model as sent, so {field} cannot be honoured (leave it out, or send the "
                           "prompt without raw to have it rendered)")
    _refuse_stop_with_json(m)
    choice = _choice(m.tool_choice)
    tools = (*(m.tools or []), *(m.functions or []))
    return Ask("prompt", prompt=m.prompt, raw=m.raw, tools=tools, **choice, final=final_format(m.response_format),
               logprobs=bool(m.logprobs), top_logprobs=m.top_logprobs or 0, **_sampling(m))


def from_messages(m: schemas.MessagesInput) -> Ask:
    # OpenAI's legacy `function_call` and answer shape; Workers AI has no `function_call` and answers `functions` as tool_calls.
    openai = isinstance(m, schemas.ChatCompletionRequest)
    _refuse_stop_with_json(m)
    choice = _choice(m.function_call if openai and m.tool_choice is None else m.tool_choice)
    tools = (*(m.tools or []), *(m.functions or []))
    return Ask("messages", messages=m.messages, tools=tools, **choice, final=final_format(m.response_format),
               logprobs=bool(m.logprobs), top_logprobs=m.top_logprobs or 0, legacy_functions=openai and bool(m.functions) and not m.tools,
               **_sampling(m))


def from_completion(m: schemas.CompletionRequest) -> list[Ask]:
    """One Ask per prompt: a list of prompts is a batch, each prompt answered by its own `n` choices (OpenAI's meaning)."""
    prompts = [m.prompt] if isinstance(m.prompt, str) else m.prompt
    _refuse_unhonoured({"response_format": _structured(m.response_format)},
                       "/v1/completions sends the prompt to the model as sent, so {field} cannot be honoured (leave it "
                       "out, or ask /v1/chat/completions)")
    if m.echo and m.logprobs is not None:  # OpenAI would add the prompt's tokens and their logprobs to the answer's
        raise bad_input("Error: at '/echo': echo with logprobs needs the prompt logprobs, which this server does not compute: "
                        "ask for one or the other", "echo")
    # Legacy completions' `logprobs: N` means both "return logprobs" and "N alternatives per token".
    return [Ask("completions", prompt=prompt, raw=True, logprobs=m.logprobs is not None, top_logprobs=m.logprobs or 0,
                echo=bool(m.echo), **_sampling(m)) for prompt in prompts]


# The Responses `include` value that asks for the answer text's logprobs (OpenAI's spelling).
OUTPUT_TEXT_LOGPROBS = "message.output_text.logprobs"


def from_responses(m: schemas.ResponsesInput) -> Ask:
    """Logprobs only with `include: ["message.output_text.logprobs"]`, as on OpenAI (where `top_logprobs` alone
    returns `logprobs: []`)."""
    choice = _choice(m.tool_choice)
    logprobs = OUTPUT_TEXT_LOGPROBS in (m.include or ())
    return Ask("responses", items=m.input, stored_items=m._stored_items, truncate=m.truncation == "auto", instructions=m.instructions, tools=tuple(m.tools or ()), **choice,
               effort=m.reasoning.effort if m.reasoning else None, final=final_format(m.response_format or (m.text.format if m.text else None)),
               max_tokens=m.max_output_tokens, max_tokens_name="max_output_tokens", temperature=m.temperature, top_p=m.top_p, seed=m.seed, lora=m.lora, stream=m.stream,
               logprobs=logprobs, top_logprobs=(m.top_logprobs or 0) if logprobs else 0,
               reject_if_busy=bool(m.options and m.options.rejectIfBusy), source=m)
