"""Harmony, gpt-oss's chat format: the offline tokenizer, request rendering and a streaming parser.

The API's input shapes are typed (`shapes`); `convert_*` + `render` turn a parsed conversation into
prompt token ids (`render_request(body)` does both for a JSON body);
`StreamParser` turns generated token ids back into reasoning, answer text and tool calls,
and never raises whatever the model emits.
"""

from .events import (
    ContentDelta,
    Event,
    Finished,
    MessageEnd,
    ParsedCompletion,
    ParsedToolCall,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallStart,
)
from .inputs import Converted, RenderError, convert_chat, convert_prompt, convert_responses
from .parser import StreamParser, fold_events, new_call_id, parse_completion
from .render import RenderedPrompt, reasoning_effort, render_conversation, render_request, tool_call_prefix, tool_descriptions
from .tokenizer import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    ENDOFTEXT,
    MESSAGE,
    RETURN,
    START,
    STARTOFTEXT,
    STOP_TOKENS,
    VOCAB_SIZE,
    TextDecoder,
    TokenizerError,
    decode,
    encode,
    ensure_vocab_file,
    get_encoding,
    is_special,
    token_bytes,
)

__all__ = [
    "CALL",
    "CHANNEL",
    "CONSTRAIN",
    "END",
    "ENDOFTEXT",
    "MESSAGE",
    "RETURN",
    "START",
    "STARTOFTEXT",
    "STOP_TOKENS",
    "VOCAB_SIZE",
    "ContentDelta",
    "Converted",
    "Event",
    "Finished",
    "MessageEnd",
    "ParsedCompletion",
    "ParsedToolCall",
    "ReasoningDelta",
    "RenderError",
    "RenderedPrompt",
    "StreamParser",
    "TextDecoder",
    "ToolCallArgumentsDelta",
    "ToolCallStart",
    "TokenizerError",
    "convert_chat",
    "convert_prompt",
    "convert_responses",
    "decode",
    "encode",
    "ensure_vocab_file",
    "fold_events",
    "get_encoding",
    "is_special",
    "new_call_id",
    "parse_completion",
    "reasoning_effort",
    "render_conversation",
    "render_request",
    "token_bytes",
    "tool_call_prefix",
    "tool_descriptions",
]
