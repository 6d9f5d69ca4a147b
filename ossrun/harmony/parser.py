"""Streaming harmony parser: generated token ids in, API events out, one token at a time.

It never raises. Hosted servers crash whole requests on harmony parse errors (an unexpected
token must never become a 500), so every oddity the model can produce — text after `<|end|>`
without `<|start|>`, a missing `<|message|>`, a stray `<|start|>` or `<|channel|>`, recipients in
odd places, unknown special tokens, ids outside the vocabulary — is turned into the most
sensible events and recorded in `anomalies`. In the worst case the text comes out as final
content. `openai_harmony.StreamableParser` is not used as the core because it raises on exactly
these inputs (and leaks `<|channel|>` into recipients); its results are the reference for
well-formed completions in the tests.
"""

from __future__ import annotations

import enum
import logging
import operator
import re
import secrets
from typing import Callable, Iterable, Sequence

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
from .header import PARTIAL_PIECES, Header, parse_header
from .tokenizer import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    MESSAGE,
    RETURN,
    START,
    VOCAB_SIZE,
    TextDecoder,
    is_special,
    token_bytes,
)

log = logging.getLogger(__name__)

MAX_ANOMALIES = 32  # a model stuck in a loop of oddities must not grow the list without bound
MAX_HEADER_TOKENS = 64  # a real header is ~20 tokens; past this, the "header" is text missing its <|message|>
_SPELLED = {CHANNEL: b"<|channel|>", CONSTRAIN: b"<|constrain|>"}


def new_call_id() -> str:
    """A fresh tool call id in the API's shape."""
    return "chatcmpl-tool-" + secrets.token_hex(8)


class _State(enum.Enum):
    EXPECT_START = "expect_start"  # between messages
    HEADER = "header"  # after <|start|>, before <|message|>
    CONTENT = "content"  # message text
    DONE = "done"  # after <|return|>, <|call|> or finish()


class _Kind(enum.Enum):
    REASONING = "reasoning"
    CONTENT = "content"
    TOOL = "tool"


class StreamParser:
    """Feed generated token ids; get events. `anomalies` says what was odd, `finish_reason` how it ended.

    By default the prompt is taken to end with `<|start|>assistant` (what `render_request` renders).
    For raw prompts pass `prompt_ids`: the parser then starts where the prompt left off.
    """

    def __init__(
        self,
        *,
        prompt_ids: Sequence[int] | None = None,
        call_id_factory: Callable[[], str] = new_call_id,
    ) -> None:
        self.anomalies: list[str] = []
        self.finish_reason: str | None = None
        self._new_call_id = call_id_factory
        self._tool_calls = 0
        self._after_stop_noted = False
        self._pending: list[Event] = []
        self._salvaged: int | None = None
        self.in_open_header = False  # the last token fed went into a header still open (`feed`)
        self.reasoning_tokens = 0  # how many tokens so far are text of a reasoning message (`feed`, `_salvage_header`)
        self._begin_header(has_role=True, initial=b"assistant")
        if prompt_ids is not None:
            self._resume_after(prompt_ids)

    # --- public API -------------------------------------------------------------------------

    def feed(self, token_id: int) -> list[Event]:
        """Events caused by one generated token (often none, e.g. inside a header)."""
        events, self._pending = self._pending, []
        header, was_reasoning = self._open_header(), self._in_reasoning
        try:
            token = self._valid_token(token_id)
            if token is not None:
                self._feed(token, events)
        except Exception as exc:  # the guarantee: a parse problem never ends a stream
            log.exception("harmony parser failed on token %r; continuing as final content", token_id)
            self._note(f"parser error on token {token_id!r}: {exc!r}")
            self._recover(token_id, events)
        # A special token inside a header (a stray `<|channel|>`, an unknown one) leaves it open: the header's
        # earlier text may still be read as the answer, so a caller listing the tokens behind it keeps them.
        self.in_open_header = header is not None and header is self._open_header()
        # A token fed inside a reasoning message and still inside one after is reasoning, whether or not its bytes
        # finish a character yet (a split CJK character or emoji shows no text until its last token).
        self.reasoning_tokens += int(was_reasoning and self._in_reasoning)
        return events

    @property
    def _in_reasoning(self) -> bool:
        return self._state is _State.CONTENT and self._kind is _Kind.REASONING

    def answer_preview(self) -> str:
        """The answer text the open header would become if generation ended now (`finish`): stop strings watch it, so
        that one completing there ends generation at once, not when the header is given up on (at its end, or
        MAX_HEADER_TOKENS later: until then the answer was billed tokens past its stop). A last word that may still
        grow into a header piece (` to` before `=functions.…`) is left out, as is a character not finished yet.
        Empty outside a header, or when the header would open no answer (a reasoning message, a tool call)."""
        if self._state is not _State.HEADER:
            return ""
        header = self._parse_header(record=False, cut=True)
        if header.tool_name or header.channel == "analysis":
            return ""
        text = TextDecoder().feed_bytes(self._ordinary_header_bytes(self._text_length(header)))
        word = re.search(r"\S*$", text).group()
        return text[:len(text) - len(word)] if word and any(piece.startswith(word) for piece in PARTIAL_PIECES) else text

    def _open_header(self) -> bytearray | None:
        """The header being read (each header is a new object), None outside one."""
        return self._header if self._state is _State.HEADER else None

    def take_salvaged(self) -> int | None:
        """After a header without <|message|> was read as message text (since the last call): how many of the
        header's last ordinary tokens have their whole text in that message: those from the text's start on (a
        special token among them spells none of it, and the ordinary text on both sides of it is kept).
        The tokens before them spelled header pieces or the whitespace after one (`assistant`, `final`,
        `to=...`), which the message leaves out; a caller listing the tokens behind the text (logprobs) drops
        them. None: no header was salvaged."""
        salvaged, self._salvaged = self._salvaged, None
        return salvaged

    def finish(self, reason_if_not_stopped: str = "length") -> list[Event]:
        """Close the stream. A completion already ended by `<|return|>`/`<|call|>` keeps its reason."""
        if self._state is _State.DONE:
            return []
        events, self._pending = self._pending, []
        try:
            if self._state is _State.HEADER:
                self._salvage_header(events, truncated=True)
            if self._state is _State.CONTENT:
                self._end_message(events, cut=True)
        except Exception as exc:
            log.exception("harmony parser failed while finishing")
            self._note(f"parser error at finish: {exc!r}")
        self.finish_reason = reason_if_not_stopped
        self._state = _State.DONE
        events.append(Finished(reason_if_not_stopped))
        return events

    # --- dispatch ---------------------------------------------------------------------------

    def _feed(self, token: int, events: list[Event]) -> None:
        if self._state is _State.DONE:
            if not self._after_stop_noted:
                self._after_stop_noted = True
                self._note(f"tokens after the end of the completion ignored (first: {token})")
            return
        if token == START:
            self._on_start(events)
        elif token == MESSAGE:
            self._on_message(events)
        elif token == END:
            self._on_end(events)
        elif token in (RETURN, CALL):
            self._on_stop(token, events)
        elif token == CHANNEL:
            self._on_channel(events)
        elif token == CONSTRAIN and self._state is _State.HEADER:
            self._add_to_header(_SPELLED[CONSTRAIN], events, special=True)
        elif is_special(token):
            self._note(f"unexpected token {token_bytes(token).decode()} ignored")
        else:
            self._on_text(token, events)

    def _on_start(self, events: list[Event]) -> None:
        if self._state is _State.HEADER:
            self._note("<|start|> inside a header")
            self._salvage_header(events)
        if self._state is _State.CONTENT:
            self._note("<|start|> before the message's <|end|>")
            self._end_message(events)
        self._begin_header(has_role=True)

    def _on_message(self, events: list[Event]) -> None:
        if self._state is _State.CONTENT:
            self._note("<|message|> inside message text ignored")
            return
        if self._state is _State.EXPECT_START:
            self._note("<|message|> without a header")
            self._begin_header(has_role=False)
        header = self._parse_header()
        if header.rest.strip():
            self._note(f"unreadable header text dropped: {header.rest!r}")
        self._open_message(header, events)

    def _on_end(self, events: list[Event]) -> None:
        if self._state is _State.EXPECT_START:
            self._note("<|end|> outside a message ignored")
            return
        if self._state is _State.HEADER:
            self._salvage_header(events)
        if self._state is _State.CONTENT:
            self._end_message(events)

    def _on_stop(self, token: int, events: list[Event]) -> None:
        if self._state is _State.HEADER:
            self._salvage_header(events)
        was_tool_call = self._state is _State.CONTENT and self._kind is _Kind.TOOL
        if self._state is _State.CONTENT:
            self._end_message(events)
        if token == CALL and not was_tool_call:
            self._note("<|call|> ended a message that is no tool call")
        if token == RETURN and was_tool_call:
            self._note("<|return|> ended a tool call")
        # Any tool call asks the client to run it, whichever token ended the completion.
        self.finish_reason = "tool_calls" if self._tool_calls else "stop"
        self._state = _State.DONE
        events.append(Finished(self.finish_reason))

    def _on_channel(self, events: list[Event]) -> None:
        if self._state is _State.CONTENT:
            self._note("<|channel|> inside message text: a new message begins there")
            self._end_message(events)
            self._begin_header(has_role=False)
        elif self._state is _State.EXPECT_START:
            self._note("<|channel|> without <|start|>")
            self._begin_header(has_role=False)
        self._add_to_header(_SPELLED[CHANNEL], events, special=True)

    def _on_text(self, token: int, events: list[Event]) -> None:
        if self._state is _State.EXPECT_START:
            self._note("text after <|end|> without <|start|>")
            self._begin_header(has_role=False)
        if self._state is _State.HEADER:
            self._add_to_header(token_bytes(token), events)
        else:
            self._emit(self._decoder.feed(token), events)

    # --- headers ----------------------------------------------------------------------------

    def _begin_header(self, *, has_role: bool, initial: bytes = b"") -> None:
        self._state = _State.HEADER
        self._header = bytearray(initial)
        self._given = len(initial)  # the header's first bytes came with the prompt (its role), not from the model
        self._specials: list[tuple[int, int]] = []  # byte spans of the header spelled by special tokens
        self._token_spans: list[tuple[int, int]] = []  # each ordinary token's bytes in the header
        self._header_tokens = 0
        self._has_role = has_role

    def _add_to_header(self, data: bytes, events: list[Event], *, special: bool = False) -> None:
        if special:
            self._specials.append((len(self._header), len(self._header) + len(data)))
        else:
            self._token_spans.append((len(self._header), len(self._header) + len(data)))
        self._header += data
        self._header_tokens += 1
        if self._header_tokens > MAX_HEADER_TOKENS:
            self._note(f"no <|message|> after {MAX_HEADER_TOKENS} header tokens: read as message text")
            self._salvage_header(events)

    def _parse_header(self, *, record: bool = True, cut: bool = False) -> Header:
        # surrogateescape keeps a character cut at the end of the header intact for _salvage_header.
        header = parse_header(self._header.decode("utf-8", "surrogateescape"), has_role=self._has_role, cut=cut)
        for anomaly in header.anomalies if record else ():
            self._note(anomaly)
        return header

    def _salvage_header(self, events: list[Event], *, truncated: bool = False) -> None:
        """A header that never got its <|message|>: the ordinary text after the recognisable part is message text.

        The special tokens in that rest are dropped: their spelling is harmony's, never the answer's.
        `truncated`: generation stopped inside the header (max_tokens), which is no anomaly; an unfinished last
        piece (` to=` before a tool's name) is then header, never text.
        """
        header = self._parse_header(record=not truncated, cut=truncated)
        self._state = _State.EXPECT_START
        rest = self._text_length(header)
        offset = len(self._header) - rest
        if self._token_spans:  # a header of special tokens alone (`<|start|>` as the last token) keeps an earlier count
            self._salvaged = sum(1 for start, _ in self._token_spans if start >= offset)
        text = self._ordinary_header_bytes(rest)
        if not text:
            if not truncated:
                self._note("header without <|message|> or text dropped")
            return
        if not truncated:
            self._note("header without <|message|>: text after it read as the message")
        self._open_message(header, events)
        if self._in_reasoning:  # its tokens were fed to the header, so `feed` counted none: those of its text count
            self.reasoning_tokens += sum(1 for _, end in self._token_spans if end > offset)
        self._emit(self._decoder.feed_bytes(text), events)

    def _text_length(self, header: Header) -> int:
        """How many of a salvaged header's last bytes are message text: those after its recognised pieces and the
        whitespace that ends them. But when the prompt gave the role and the model wrote no piece of its own, all
        it wrote is text: a model that skips the header starts its text at once, so the whitespace it begins
        with separates nothing, and a first word glued to the prompt's `assistant` is no role."""
        rest = len(header.rest.encode("utf-8", "surrogateescape"))
        if self._given and self._no_piece_between(self._given, len(self._header) - rest):
            return len(self._header) - self._given
        return rest

    def _no_piece_between(self, start: int, end: int) -> bool:
        """Whether the header's bytes [start, end) hold no header piece: no special token, no role, channel,
        recipient or type."""
        if any(begin < end and start < stop for begin, stop in self._specials):
            return False
        alone = parse_header(self._header[start:end].decode("utf-8", "surrogateescape"), has_role=False)
        return not (alone.role or alone.channel or alone.recipient or alone.content_type)

    def _ordinary_header_bytes(self, tail: int) -> bytes:
        """The header's last `tail` bytes without those that special tokens spelled."""
        start = len(self._header) - tail
        kept, pos = bytearray(), start
        for begin, end in self._specials:
            if end <= pos:
                continue
            kept += self._header[pos:max(pos, begin)]
            pos = max(pos, end)
        kept += self._header[pos:]
        return bytes(kept)

    # --- messages ---------------------------------------------------------------------------

    def _open_message(self, header: Header, events: list[Event]) -> None:
        self._state = _State.CONTENT
        self._decoder = TextDecoder()
        self._channel = header.channel or "final"
        self._recipient = header.recipient
        if header.tool_name:
            self._kind = _Kind.TOOL
            self._tool_index = self._tool_calls
            self._tool_calls += 1
            events.append(ToolCallStart(self._tool_index, self._new_call_id(), header.tool_name))
        elif header.channel == "analysis":
            self._kind = _Kind.REASONING
        else:
            self._kind = _Kind.CONTENT

    def _emit(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self._kind is _Kind.TOOL:
            events.append(ToolCallArgumentsDelta(self._tool_index, text))
        elif self._kind is _Kind.REASONING:
            events.append(ReasoningDelta(text))
        else:
            events.append(ContentDelta(text, self._channel))

    def _end_message(self, events: list[Event], *, cut: bool = False) -> None:
        """`cut`: generation ended inside the message (`finish`), not the model (`TextDecoder.cut`)."""
        self._emit(self._decoder.cut() if cut else self._decoder.flush(), events)
        events.append(MessageEnd(self._channel, self._recipient))
        self._state = _State.EXPECT_START

    # --- robustness -------------------------------------------------------------------------

    def _valid_token(self, token_id: object) -> int | None:
        """The id as an int, or None (noted) for something that is no id of this vocabulary."""
        try:
            token = operator.index(token_id)  # type: ignore[arg-type]
        except Exception:  # not an integer at all (None, str, float, a broken __index__)
            self._note(f"non-integer token {token_id!r} ignored")
            return None
        if not 0 <= token < VOCAB_SIZE:
            self._note(f"token id {token} outside the vocabulary ignored")
            return None
        return token

    def _note(self, anomaly: str) -> None:
        if len(self.anomalies) < MAX_ANOMALIES:
            self.anomalies.append(anomaly)
            log.debug("harmony anomaly: %s", anomaly)
        elif len(self.anomalies) == MAX_ANOMALIES:
            self.anomalies.append("further anomalies not recorded")

    def _recover(self, token_id: object, events: list[Event]) -> None:
        """After an internal error: continue in a plain final-content message, keeping the token's text."""
        try:
            self._open_message(Header(channel="final"), events)
            if isinstance(token_id, int) and 0 <= token_id < VOCAB_SIZE and not is_special(token_id):
                self._emit(self._decoder.feed(token_id), events)
        except Exception:  # nothing more to save; the next token starts afresh
            log.exception("harmony parser recovery failed")
            self._state = _State.EXPECT_START

    def _resume_after(self, prompt_ids: Sequence[int]) -> None:
        """Start where a raw prompt left off: replay it from its last <|start|>, silently."""
        starts = [i for i, t in enumerate(prompt_ids) if t == START]
        if not starts:  # plain text continuation: everything generated is final text
            self._open_message(Header(channel="final"), [])
            return
        replayed: list[Event] = []
        self._state = _State.EXPECT_START
        for token in prompt_ids[starts[-1]:]:
            replayed.extend(self.feed(token))
        if self._state is _State.DONE:  # the prompt itself ended a completion; generate a new one
            self._state, self.finish_reason = _State.EXPECT_START, None
        if self._state is _State.CONTENT and self._kind is _Kind.TOOL:
            self._pending = [e for e in replayed if isinstance(e, ToolCallStart)][-1:]
        if self._state is _State.HEADER:
            self._given = len(self._header)
        self.anomalies.clear()  # oddities of the caller's prompt are not the model's
        self._salvaged, self.in_open_header, self.reasoning_tokens = None, False, 0


def parse_completion(
    token_ids: Iterable[int],
    *,
    reason_if_not_stopped: str = "length",
    prompt_ids: Sequence[int] | None = None,
    call_id_factory: Callable[[], str] = new_call_id,
) -> ParsedCompletion:
    """A whole completion at once, folded from the streaming parser's events."""
    parser = StreamParser(prompt_ids=prompt_ids, call_id_factory=call_id_factory)
    events = [e for t in token_ids for e in parser.feed(t)]
    events += parser.finish(reason_if_not_stopped)
    return fold_events(events, parser.anomalies)


def fold_events(events: Iterable[Event], anomalies: Sequence[str] = ()) -> ParsedCompletion:
    """Accumulate events into one ParsedCompletion."""
    out = ParsedCompletion(anomalies=list(anomalies))
    reasoning: list[str] = []
    content: list[str] = []
    calls: dict[int, ParsedToolCall] = {}
    for event in events:
        if isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ToolCallStart):
            calls[event.index] = ParsedToolCall(event.call_id, event.name)
            out.tool_calls.append(calls[event.index])
        elif isinstance(event, ToolCallArgumentsDelta) and event.index in calls:
            calls[event.index].arguments += event.text
        elif isinstance(event, Finished):
            out.finish_reason = event.reason
    out.reasoning, out.content = "".join(reasoning), "".join(content)
    return out
