"""The streaming parser: exact events for good completions, sensible ones for every known bad shape, never an exception."""

from __future__ import annotations

import itertools
import re

import pytest
from openai_harmony import Role

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
    new_call_id,
    parse_completion,
)
from ossrun.harmony import parser as parser_module


def toks(text: str) -> list[int]:
    """Token ids with harmony's special tokens spelled out in `text`."""
    return encode(text, allow_special=True)


def counter_ids():
    numbers = itertools.count()
    return lambda: f"call-{next(numbers)}"


def run(tokens: list[int], reason: str = "length") -> tuple[list, StreamParser]:
    parser = StreamParser(call_id_factory=counter_ids())
    events = [e for t in tokens for e in parser.feed(t)]
    return events + parser.finish(reason), parser


def parse(text: str):
    return parse_completion(toks(text), call_id_factory=counter_ids())


def merged(events: list) -> list:
    """Adjacent deltas of one kind joined, so expectations do not depend on token boundaries."""
    out: list = []
    for e in events:
        if out and type(e) is type(out[-1]) and isinstance(e, (ReasoningDelta, ContentDelta)):
            out[-1] = type(e)(out[-1].text + e.text)
        elif out and isinstance(e, ToolCallArgumentsDelta) and isinstance(out[-1], ToolCallArgumentsDelta):
            out[-1] = ToolCallArgumentsDelta(e.index, out[-1].text + e.text)
        else:
            out.append(e)
    return out


# --- well-formed completions -----------------------------------------------------------------


def test_reasoning_then_final_answer():
    text = "<|channel|>analysis<|message|>User says hi.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>"
    events, parser = run(toks(text))
    assert merged(events) == [
        ReasoningDelta("User says hi."),
        MessageEnd("analysis"),
        ContentDelta("Hello!"),
        MessageEnd("final"),
        Finished("stop"),
    ]
    assert parser.finish_reason == "stop" and parser.anomalies == []


def test_tool_call_streams_start_then_arguments():
    text = (
        "<|channel|>analysis<|message|>Need the weather.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location":"Tokyo"}<|call|>'
    )
    events, parser = run(toks(text))
    assert merged(events) == [
        ReasoningDelta("Need the weather."),
        MessageEnd("analysis"),
        ToolCallStart(0, "call-0", "get_weather"),
        ToolCallArgumentsDelta(0, '{"location":"Tokyo"}'),
        MessageEnd("commentary", "functions.get_weather"),
        Finished("tool_calls"),
    ]
    assert parser.anomalies == []


def test_two_tool_calls_and_a_preamble():
    text = (
        "<|channel|>commentary<|message|>Checking both.<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"location":"A"}<|end|>'
        '<|start|>assistant to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>{"tz":"B"}<|call|>'
    )
    result = parse(text)
    assert result.content == "Checking both."
    assert [(c.call_id, c.name, c.arguments) for c in result.tool_calls] == [
        ("call-0", "get_weather", '{"location":"A"}'),
        ("call-1", "get_time", '{"tz":"B"}'),
    ]
    assert result.finish_reason == "tool_calls" and result.anomalies == []


def test_length_mid_message_closes_it():
    events, parser = run(toks("<|channel|>final<|message|>Once upon a"), reason="length")
    assert merged(events) == [ContentDelta("Once upon a"), MessageEnd("final"), Finished("length")]
    assert parser.finish_reason == "length" and parser.anomalies == []


def test_length_inside_a_tool_call_header_emits_no_half_call():
    result = parse("<|channel|>analysis<|message|>Call it.<|end|><|start|>assistant to=functions.get_we")
    assert result.tool_calls == [] and result.finish_reason == "length" and result.anomalies == []


def test_finish_after_stop_keeps_the_reason_and_emits_nothing():
    parser = StreamParser()
    for t in toks("<|channel|>final<|message|>Hi<|return|>"):
        parser.feed(t)
    assert parser.finish("length") == []
    assert parser.finish_reason == "stop"


def test_default_call_ids_have_the_api_shape():
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{16}", new_call_id())
    result = parse_completion(toks("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>"))
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{16}", result.tool_calls[0].call_id)


# --- known failure shapes from other servers ---------------------------------------------------


def test_constrain_after_recipient_in_the_first_header():
    result = parse('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location":"Oslo"}<|call|>')
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", '{"location":"Oslo"}')]
    assert result.finish_reason == "tool_calls" and result.anomalies == []


def test_recipient_before_the_channel():
    result = parse(' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"location":"Rome"}<|call|>')
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", '{"location":"Rome"}')]
    assert result.anomalies == []


def test_channel_token_leaking_into_the_tool_name():
    result = parse("<|channel|>commentary to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{}<|call|>")
    assert [c.name for c in result.tool_calls] == ["get_weather"]
    assert result.finish_reason == "tool_calls"
    assert any("repeated" in a for a in result.anomalies)


def test_channel_spelled_as_text_leaking_into_the_tool_name():
    tokens = toks("<|channel|>commentary") + encode(" to=functions.get_weather<|channel|>commentary json") + toks("<|message|>{}<|call|>")
    result = parse_completion(tokens, call_id_factory=counter_ids())
    assert [c.name for c in result.tool_calls] == ["get_weather"]


def test_text_after_end_without_start_becomes_content():
    result = parse("<|channel|>final<|message|>Hello.<|end|> Anything else?<|return|>")
    assert result.content == "Hello. Anything else?"
    assert result.finish_reason == "stop"
    assert "text after <|end|> without <|start|>" in result.anomalies


def test_header_after_end_without_start_is_still_read_as_a_header():
    result = parse("<|channel|>analysis<|message|>Think.<|end|>assistant<|channel|>final<|message|>Answer.<|return|>")
    assert (result.reasoning, result.content) == ("Think.", "Answer.")
    assert "text after <|end|> without <|start|>" in result.anomalies


def test_missing_message_token_reads_the_rest_as_the_message():
    result = parse("<|channel|>final Hello there<|return|>")
    assert result.content == "Hello there"
    assert result.finish_reason == "stop"
    assert any("without <|message|>" in a for a in result.anomalies)


def test_missing_message_token_in_a_tool_call():
    result = parse('<|channel|>commentary to=functions.get_weather <|constrain|>json{"location":"Lima"}<|call|>')
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", '{"location":"Lima"}')]
    assert result.finish_reason == "tool_calls"


def test_a_salvaged_header_keeps_its_ordinary_text_and_drops_special_tokens():
    """The tester's repro: the header's unreadable rest is the answer, never with `<|channel|>` spelled in it."""
    assert parse_completion(encode(" hi") + [200005] + encode(" x") + [200002]).content == " hi x"
    assert parse_completion(encode(" hi") + [200005] + encode("final")).content == " hifinal"  # cut by max_tokens
    result = parse("<|channel|>final<|message|>A<|end|><|channel|>xyz Hello<|return|>")  # an unknown channel: all text
    assert result.content == "Axyz Hello"
    streamed, _ = run(encode(" hi") + toks("<|channel|>") + encode(" x") + toks("<|return|>"))
    assert merged(streamed) == [ContentDelta(" hi x"), MessageEnd("final"), Finished("stop")]



@pytest.mark.parametrize("cut", [" to", " to=", " to=functions.get_wea", " t"])
def test_a_header_cut_before_its_recipient_name_leaves_no_text(cut):
    """max_tokens stopping the header after ` to` or ` to=` (the recipient's name not yet written) made `to=` the
    answer: an unfinished piece of a cut header is header. Text after a finished piece stays the answer."""
    result = parse_completion(toks("<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>commentary" + cut))
    assert (result.reasoning, result.content, result.tool_calls, result.finish_reason) == ("Hmm.", "", [], "length")
    assert parse("<|channel|>commentary to<|return|>").content == "to"  # not cut: the model's (odd) text
    assert parse_completion(encode(" to")).content == " to"  # no header at all: all it wrote is the answer


def test_a_header_less_answer_keeps_the_whitespace_it_starts_with():
    """A model that skips the header writes its text right after the prompt's `assistant`: whitespace there is
    the answer's, not a separator (a random model's greedy `\tnull`: the tab was dropped from the content while
    its token's logprobs entry spelled it), and a first word is no part of a role `assistantJust` (it was
    dropped). After a piece the model wrote itself, whitespace still separates."""
    assert parse_completion(encode("\tnull cilind") + toks("<|return|>")).content == "\tnull cilind"
    assert parse_completion(encode("\n\nHello")).content == "\n\nHello"  # cut by max_tokens
    assert parse_completion(encode("Just text") + toks("<|return|>")).content == "Just text"  # no role `assistantJust`
    assert parse("<|channel|>final Hello<|return|>").content == "Hello"
    assert parse("<|channel|>fin<|start|>assistant<|channel|>final<|message|>Done.<|return|>").content == "Done."


@pytest.mark.parametrize(("generated", "whole"), [
    ("<|channel|>final Hello there", 1),  # `final` is a piece, ` Hello` straddles the text's start, ` there` is in it
    (" hi<|channel|> x", 2),  # the text on both sides of a special token (hunt round 17 B-F1: only ` x` was counted)
    ("\tnull cilind", 2),  # no piece of the model's: all of it (two tokens) is text
])
def test_a_salvaged_header_says_how_many_of_its_last_tokens_the_text_holds_whole(generated, whole):
    """What the logprobs need: the tokens whose whole text is in the message read from a header without <|message|>."""
    parser = StreamParser()
    for token in toks(generated):
        parser.feed(token)
    assert parser.take_salvaged() is None  # nothing salvaged yet
    parser.feed(toks("<|return|>")[0])
    assert parser.take_salvaged() == whole and parser.take_salvaged() is None

@pytest.mark.parametrize(("generated", "counted"), [
    ("<|channel|>analysis Lowell surprisingly", 2),  # ` Lowell` is text but for its space
    ("<|channel|>analysis Lowell surprisingly<|end|>", 2),  # given up on at <|end|>, not at the end of generation
    ("<|channel|>analysis\n\n Lowell", 1),  # the whitespace that ends the header's pieces is no part of the text
    ("<|channel|>final Lowell surprisingly", 0),  # the answer's, not reasoning
    ("<|channel|>analysis<|message|>Hmm.<|end|>", 2),  # a message as it should be: `Hmm`, `.`
])
def test_a_header_read_as_reasoning_counts_the_tokens_of_its_text(generated, counted):
    """Hunt round 17 B-F3: reasoning read from a header that never got its <|message|> is reasoning text, so its
    tokens are reasoning tokens; they were fed while the parser was in the header and none was counted."""
    parser = StreamParser()
    for token in toks(generated):
        parser.feed(token)
    parser.finish()
    assert parser.reasoning_tokens == counted


def test_a_raw_prompt_s_own_reasoning_is_not_counted():
    """Tokens the prompt already holds are replayed to find where it left off; none of them is generated."""
    parser = StreamParser(prompt_ids=toks("<|start|>assistant<|channel|>analysis<|message|>Thinking so far"))
    parser.feed(encode(" more")[0])
    assert parser.reasoning_tokens == 1


@pytest.mark.parametrize(("generated", "preview"), [
    (" Hello there", " Hello there"),  # no piece of the model's: all it wrote, as `finish` would read it
    ("<|channel|>final Hello there", "Hello there"),  # the text after the header's pieces
    ("<|channel|>final to", ""), (" Hello to", " Hello "),  # ` to` may yet be ` to=functions.…`: left out for now
    ("<|channel|>commentary to=functions.get_weather", ""), ("<|channel|>analysis Hmm", ""),  # a call, reasoning: no answer
    ("<|channel|>final<|message|>Hi", ""),  # a message's text is the parser's own to emit
])
def test_the_answer_preview_is_the_text_an_open_header_would_become(generated, preview):
    """What stop strings look ahead at (hunt round 17 B-F2): a header's text is the answer only once the header is
    given up on, and a stop string completing there must end generation now, not up to 64 tokens later."""
    parser = StreamParser()
    for token in toks(generated):
        parser.feed(token)
    assert parser.answer_preview() == preview
    if preview:
        assert merged(parser.finish()).pop(0).text.startswith(preview)


def test_the_answer_preview_leaves_out_a_character_not_finished_yet():
    parser = StreamParser()
    for token in encode(" Hi") + [4103]:  # 4103: the first two bytes of a four-byte character
        parser.feed(token)
    assert parser.answer_preview() == " Hi"


def test_a_special_token_inside_a_header_leaves_it_open():
    """What a caller listing the tokens behind the answer needs (hunt round 17 B-F1): a stray or unknown special token
    inside a header keeps its earlier text in play (`in_open_header`); `<|start|>` or `<|message|>` does not."""
    parser, opened = StreamParser(), []
    for token in encode(" hi") + toks("<|channel|>") + [200010] + toks("<|start|><|channel|>final<|message|>"):  # 200010: reserved
        parser.feed(token)
        opened.append(parser.in_open_header)
    assert opened == [True, True, True, False, True, True, False]


def test_a_header_ended_by_the_last_token_keeps_its_count():
    """Hunt round 17 B-F1: `<|start|>` as the last token read the header before it as the answer, and `finish` then
    gave up on the new, empty header: its count (0) replaced the first one's, and the whole last text lost its logprobs."""
    parser = StreamParser()
    for token in encode(" hi") + toks("<|channel|>") + encode(" x") + toks("<|start|>"):
        parser.feed(token)
    parser.finish()
    assert parser.take_salvaged() == 2


def test_header_text_spelling_a_special_token_is_ordinary_text():
    """Ordinary tokens that spell `<|channel|>` are text the model wrote, so a salvaged header keeps them."""
    result = parse_completion(encode(" hi<|channel|> x") + toks("<|return|>"))
    assert result.content == " hi<|channel|> x"


def test_unexpected_start_inside_a_message_ends_it():
    result = parse("<|channel|>analysis<|message|>Hmm<|start|>assistant<|channel|>final<|message|>Done.<|return|>")
    assert (result.reasoning, result.content) == ("Hmm", "Done.")
    assert "<|start|> before the message's <|end|>" in result.anomalies


def test_unexpected_start_inside_a_header():
    result = parse("<|channel|>fin<|start|>assistant<|channel|>final<|message|>Done.<|return|>")
    assert result.content == "Done."
    assert "<|start|> inside a header" in result.anomalies


def test_channel_inside_a_message_starts_the_next_one():
    result = parse("<|channel|>analysis<|message|>Think<|channel|>final<|message|>Answer<|return|>")
    assert (result.reasoning, result.content) == ("Think", "Answer")


def test_call_without_a_tool_call_finishes_with_stop():
    result = parse("<|channel|>final<|message|>Hi<|call|>")
    assert result.content == "Hi" and result.finish_reason == "stop"
    assert any("<|call|>" in a for a in result.anomalies)


def test_tool_call_ended_by_return_still_reports_tool_calls():
    result = parse("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|return|>")
    assert result.finish_reason == "tool_calls" and len(result.tool_calls) == 1
    assert "<|return|> ended a tool call" in result.anomalies


def test_tokens_after_a_stop_token_are_ignored():
    events, parser = run(toks("<|channel|>final<|message|>Hi<|return|> more<|end|><|start|>"))
    assert merged(events) == [ContentDelta("Hi"), MessageEnd("final"), Finished("stop")]
    assert len(parser.anomalies) == 1 and "after the end" in parser.anomalies[0]


def test_message_without_a_channel_is_final_content():
    result = parse("<|message|>Plain answer<|return|>")
    assert result.content == "Plain answer"
    assert "header without a channel" in result.anomalies


def test_header_without_message_runs_on_into_text_that_still_streams():
    parser = StreamParser()
    events = [e for t in toks("<|channel|>final" + " word" * 80) for e in parser.feed(t)]
    assert merged(events)[0].text.strip().startswith("word")  # streaming resumed before the end
    assert any("header tokens" in a for a in parser.anomalies)


@pytest.mark.parametrize("odd", ["<|endoftext|>", "<|reserved_200017|>", "<|startoftext|>", "<|constrain|>", "<|end|>"])
def test_stray_special_tokens_in_text_are_ignored(odd):
    result = parse(f"<|channel|>final<|message|>A<|end|>{odd}<|start|>assistant<|channel|>final<|message|>B<|return|>")
    assert result.content == "AB" and result.finish_reason == "stop"
    assert result.anomalies


class BrokenIndex:
    def __index__(self):
        raise ValueError("no")


@pytest.mark.parametrize("bad", [-1, 201088, 10**12, None, "7", 3.5, object(), BrokenIndex()])
def test_ids_that_are_no_tokens_are_ignored(bad):
    parser = StreamParser()
    tokens = toks("<|channel|>final<|message|>Hi")
    events = [e for t in tokens[:-1] for e in parser.feed(t)] + parser.feed(bad) + parser.feed(tokens[-1])
    assert fold_events(events).content == "Hi"
    assert len(parser.anomalies) == 1


def test_numpy_style_integers_are_accepted():
    class IndexLike:
        def __init__(self, value):
            self.value = value

        def __index__(self):
            return self.value

    result = parse_completion([IndexLike(t) for t in toks("<|channel|>final<|message|>Hi<|return|>")])
    assert result.content == "Hi" and result.anomalies == []


def test_a_message_from_another_role_is_recorded_and_kept():
    result = parse(
        "<|channel|>final<|message|>A<|end|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>B<|end|>"
    )
    assert result.content == "AB" and result.tool_calls == []
    assert any("functions.get_weather" in a for a in result.anomalies)


def test_anomalies_are_capped():
    parser = StreamParser()
    for _ in range(200):
        parser.feed(toks("<|endoftext|>")[0])
    assert len(parser.anomalies) == parser_module.MAX_ANOMALIES + 1


def test_an_internal_error_becomes_an_anomaly_and_final_content(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(parser_module, "parse_header", broken)
    parser = StreamParser()
    events = [e for t in toks("<|channel|>analysis<|message|>still here") for e in parser.feed(t)]
    events += parser.finish()
    assert "still here" in fold_events(events).content
    assert any("boom" in a for a in parser.anomalies)
    assert isinstance(events[-1], Finished)


# --- UTF-8 split across tokens ---------------------------------------------------------------


def _multi_token_char() -> str:
    for char in ["🦜", "🫠", "𓀀", "\U0001fae8"]:
        if len(encode(char)) > 1:
            return char
    raise AssertionError("no multi-token character found")


def test_a_character_split_across_tokens_is_never_split_across_deltas():
    char = _multi_token_char()
    events, _ = run(toks(f"<|channel|>final<|message|>a{char}b{char}<|return|>"))
    texts = [e.text for e in events if isinstance(e, ContentDelta)]
    assert "".join(texts) == f"a{char}b{char}"
    assert all("\ufffd" not in t for t in texts)
    assert any(char in t for t in texts)


def test_split_character_in_tool_arguments():
    char = _multi_token_char()
    result = parse(f'<|channel|>commentary to=functions.say <|constrain|>json<|message|>{{"text":"{char}"}}<|call|>')
    assert result.tool_calls[0].arguments == f'{{"text":"{char}"}}'


def test_truncated_character_at_length_is_dropped():
    char = _multi_token_char()
    tokens = toks("<|channel|>final<|message|>") + encode(char)[:1]
    assert parse_completion(tokens).content == ""


# --- raw prompts: start where the prompt left off -----------------------------------------------


def test_raw_prompt_ending_inside_a_final_message():
    prompt = toks("<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>")
    result = parse_completion(encode("Hello!") + toks("<|return|>"), prompt_ids=prompt)
    assert result.content == "Hello!" and result.anomalies == [] and result.finish_reason == "stop"


def test_raw_prompt_without_harmony_tokens_is_plain_continuation():
    result = parse_completion(encode(" upon a time"), prompt_ids=encode("Once"))
    assert result.content == " upon a time" and result.finish_reason == "length"


def test_raw_prompt_ending_inside_a_tool_call_announces_it_first():
    prompt = toks("<|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>{")
    parser = StreamParser(prompt_ids=prompt, call_id_factory=counter_ids())
    first = parser.feed(encode("}")[0])
    assert first[0] == ToolCallStart(0, "call-0", "f")
    assert parser.feed(toks("<|call|>")[0])[-1] == Finished("tool_calls")


# --- agreement with openai-harmony on well-formed completions -----------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Answer: 42 🎉<|return|>",
        "<|channel|>analysis<|message|>Tool.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{"q":"x"}<|call|>',
        " to=functions.lookup<|channel|>commentary json<|message|>{}<|call|>",
        "<|channel|>commentary<|message|>Let me look.<|end|>"
        "<|start|>assistant to=functions.lookup<|channel|>commentary <|constrain|>json<|message|>{}<|call|>",
    ],
)
def test_agrees_with_openai_harmony(text):
    tokens = toks(text)
    reference = get_encoding().parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    result = parse_completion(tokens)
    texts = {"analysis": "", "final": "", "commentary": ""}
    calls = []
    for m in reference:
        body = "".join(c.text for c in m.content)
        if m.recipient:
            calls.append((m.recipient.removeprefix("functions."), body))
        else:
            texts[m.channel] += body
    assert result.reasoning == texts["analysis"]
    assert result.content == texts["final"] + texts["commentary"] or result.content == texts["commentary"] + texts["final"]
    assert [(c.name, c.arguments) for c in result.tool_calls] == calls
    assert result.anomalies == []


def test_a_cut_inside_a_character_drops_its_bytes_but_a_real_end_after_them_shows_u_fffd():
    """Before: `finish` (max_tokens, a stop string, a cancel) turned the pieces of a character it cut into U+FFFD, which
    a client continuing the text carried on (hunt round 21 B-F2); vLLM never shows a partial character. A message the
    model itself ended after a partial character is invalid UTF-8, and shows as such."""
    head = toks("<|channel|>final<|message|>Party")
    partial = toks(" 🎉🎉")[0]  # b' \xf0\x9f\x8e'
    from ossrun.harmony import token_bytes
    assert token_bytes(partial) == b" \xf0\x9f\x8e"
    events, _ = run(head + [partial], "length")
    assert fold_events(events).content == "Party "
    for end in ("<|end|>", "<|return|>"):
        events, _ = run(head + [partial] + toks(end), "length")
        assert fold_events(events).content == "Party \ufffd"
    call = toks('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a":"')
    events, _ = run(call + [partial], "length")
    assert fold_events(events).tool_calls[0].arguments == '{"a":" '
