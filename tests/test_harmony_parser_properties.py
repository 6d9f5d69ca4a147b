"""Property tests: random token soup never breaks the parser; well-formed completions agree with openai-harmony."""

from __future__ import annotations

import codecs
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_harmony import Role

from ossrun import harmony
from ossrun.harmony import (
    ContentDelta,
    Finished,
    MessageEnd,
    ReasoningDelta,
    StreamParser,
    ToolCallArgumentsDelta,
    ToolCallStart,
    encode,
    fold_events,
    get_encoding,
    parse_completion,
)
from ossrun.harmony import parser as parser_module

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HARMONY_SPECIALS = [harmony.START, harmony.END, harmony.MESSAGE, harmony.CHANNEL, harmony.CONSTRAIN, harmony.RETURN, harmony.CALL]
OTHER_SPECIALS = [harmony.ENDOFTEXT, 199998, 200000, 200017, harmony.VOCAB_SIZE - 1]
# Ordinary tokens that mean something in headers, plus pieces of multi-byte characters.
HEADER_WORDS = ["assistant", "user", "analysis", "final", "commentary", " to=functions.get_weather", "to=", " json",
                "json", "functions", ".", "<|channel|>", "<|message|>", " ", "\n", "{", '"x"', "}", "🦜", "日本", "é"]
MEANINGFUL = sorted({t for word in HEADER_WORDS for t in encode(word)})

token = st.one_of(
    st.sampled_from(HARMONY_SPECIALS),
    st.sampled_from(OTHER_SPECIALS),
    st.sampled_from(MEANINGFUL),
    st.integers(0, 199_997),
)
bad_token = st.one_of(st.integers(-10, -1), st.integers(harmony.VOCAB_SIZE, 10**9))


def counter_ids():
    numbers = itertools.count()
    return lambda: f"call-{next(numbers)}"


def check_stream(events: list, parser: StreamParser) -> None:
    """What every stream must satisfy, whatever went in."""
    assert isinstance(events[-1], Finished) and sum(isinstance(e, Finished) for e in events) == 1
    assert parser.finish_reason == events[-1].reason
    started: list[int] = []
    for e in events:
        if isinstance(e, (ReasoningDelta, ContentDelta, ToolCallArgumentsDelta)):
            assert isinstance(e.text, str) and e.text
            e.text.encode("utf-8")  # no lone surrogates leak out
        if isinstance(e, ToolCallStart):
            assert e.index == len(started) and e.name and e.call_id
            started.append(e.index)
        if isinstance(e, ToolCallArgumentsDelta):
            assert e.index in started
        if isinstance(e, MessageEnd):
            assert e.channel in ("analysis", "commentary", "final")
    assert len(parser.anomalies) <= parser_module.MAX_ANOMALIES + 1
    assert all(isinstance(a, str) for a in parser.anomalies)
    # The internal-error safety net exists, but no input should need it.
    assert not any(a.startswith("parser error") for a in parser.anomalies), parser.anomalies


@SETTINGS
@given(st.lists(token, max_size=120), st.sampled_from(["length", "stop", "abort"]))
def test_random_tokens_never_raise(tokens, reason):
    parser = StreamParser(call_id_factory=counter_ids())
    events = [e for t in tokens for e in parser.feed(t)]
    events += parser.finish(reason)
    check_stream(events, parser)
    # The one-shot helper is the same machine: same result on the same tokens.
    folded = fold_events(events, parser.anomalies)
    assert parse_completion(tokens, reason_if_not_stopped=reason, call_id_factory=counter_ids()) == folded


@SETTINGS
@given(st.lists(st.one_of(token, bad_token, st.none(), st.text(max_size=2)), max_size=60),
       st.lists(token, max_size=40))
def test_garbage_and_random_prompts_never_raise(tokens, prompt):
    parser = StreamParser(prompt_ids=prompt, call_id_factory=counter_ids())
    events = [e for t in tokens for e in parser.feed(t)]
    events += parser.finish()
    check_stream(events, parser)


# Every special token's text has a `|`; ordinary tokens without one cannot spell a special between them.
PLAIN = st.one_of(st.sampled_from([t for t in MEANINGFUL if b"|" not in harmony.token_bytes(t)]),
                  st.integers(0, 199_997)).filter(lambda t: b"|" not in harmony.token_bytes(t))
SPECIAL = st.one_of(st.sampled_from(HARMONY_SPECIALS), st.sampled_from(OTHER_SPECIALS), st.integers(199_998, harmony.VOCAB_SIZE - 1))


@SETTINGS
@given(st.lists(st.one_of(PLAIN, SPECIAL), max_size=120), st.lists(st.one_of(PLAIN, SPECIAL), max_size=20))
def test_no_special_token_text_ever_reaches_an_event(tokens, prompt):
    """Specials steer the parser or are dropped: reasoning, content and arguments never spell one, with or
    without a raw prompt, streamed or folded."""
    for parser in (StreamParser(call_id_factory=counter_ids()), StreamParser(prompt_ids=prompt, call_id_factory=counter_ids())):
        events = [e for t in tokens for e in parser.feed(t)]
        events += parser.finish()
        texts = [e.text for e in events if isinstance(e, (ReasoningDelta, ContentDelta, ToolCallArgumentsDelta))]
        texts += [e.name for e in events if isinstance(e, ToolCallStart)]
        assert not any("|" in text for text in texts), texts
        folded = fold_events(events)
        assert "|" not in folded.content + folded.reasoning + "".join(c.arguments for c in folded.tool_calls)


@SETTINGS
@given(st.lists(st.integers(0, 199_997), max_size=80))
def test_ordinary_tokens_in_a_final_message_come_out_exactly(tokens):
    """No text is lost or invented: the content is the decoded tokens, split characters included, but for an
    incomplete last character, which a cut (`length`) drops and the model's own end (`<|end|>`) shows as U+FFFD."""
    prefix = encode("<|channel|>final<|message|>", allow_special=True)
    result = parse_completion(prefix + tokens)
    data = b"".join(harmony.token_bytes(t) for t in tokens)
    assert result.content == codecs.getincrementaldecoder("utf-8")("replace").decode(data)
    assert parse_completion(prefix + tokens + encode("<|end|>", allow_special=True)).content == harmony.decode(tokens)
    assert result.anomalies == []


# --- well-formed completions: agreement with openai-harmony ------------------------------------

TEXT = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), st.sampled_from("\n {}\":,")),
    max_size=40,
)
NAME = st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True)
MESSAGE = st.one_of(
    st.tuples(st.just("analysis"), TEXT),
    st.tuples(st.just("final"), TEXT),
    st.tuples(st.just("commentary"), TEXT),
    st.tuples(NAME, TEXT),  # a tool call: (function name, arguments)
)


def render_completion(messages: list[tuple[str, str]]) -> list[int]:
    """What the model would generate after `<|start|>assistant` for these messages."""
    parts = []
    for i, (kind, text) in enumerate(messages):
        head = "" if i == 0 else "<|start|>assistant"
        if kind in ("analysis", "final", "commentary"):
            head += f"<|channel|>{kind}"
        else:
            head += f"<|channel|>commentary to=functions.{kind} <|constrain|>json"
        last = i == len(messages) - 1
        end = "<|end|>" if not last else ("<|call|>" if kind not in ("analysis", "final", "commentary") else "<|return|>")
        parts.append(encode(head + "<|message|>", allow_special=True) + encode(text) + encode(end, allow_special=True))
    return [t for p in parts for t in p]


@SETTINGS
@given(st.lists(MESSAGE, min_size=1, max_size=5))
def test_well_formed_completions_agree_with_openai_harmony(messages):
    tokens = render_completion(messages)
    reference = get_encoding().parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    result = parse_completion(tokens)
    reasoning, content, calls = "", "", []
    for m in reference:
        text = "".join(c.text for c in m.content)
        if m.recipient:
            calls.append((m.recipient.removeprefix("functions."), text))
        elif m.channel == "analysis":
            reasoning += text
        else:
            content += text
    assert (result.reasoning, result.content) == (reasoning, content)
    assert [(c.name, c.arguments) for c in result.tool_calls] == calls
    assert result.anomalies == []
    assert result.finish_reason == ("tool_calls" if calls else "stop")


@SETTINGS
@given(st.lists(MESSAGE, min_size=1, max_size=4), st.data())
def test_mutated_completions_never_raise(messages, data):
    """Well-formed completions with tokens dropped, inserted and swapped: the deep states get fuzzed too."""
    tokens = render_completion(messages)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(tokens)))
        op = data.draw(st.sampled_from(["drop", "insert", "swap"]))
        if op == "drop" and i < len(tokens):
            del tokens[i]
        elif op == "insert":
            tokens.insert(i, data.draw(token))
        elif op == "swap" and i + 1 < len(tokens):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    parser = StreamParser(call_id_factory=counter_ids())
    events = [e for t in tokens for e in parser.feed(t)]
    events += parser.finish()
    check_stream(events, parser)
