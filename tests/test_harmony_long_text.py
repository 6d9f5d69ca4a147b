"""Long texts: the library's exact ids, in time linear in the text, without holding other threads.

One pre-tokenizer piece costs the harmony library time quadratic in its length while it holds the GIL;
`"x" * 200000` took minutes and froze the server, so runs of 512+ characters were cut into chunks, whose ids then
differed from the library's (any compact JSON that long: hunt_render #2). Texts are now encoded by tiktoken, which is
not quadratic and lets other threads run, and the library renders only the frame around them (hunt_security #8: its
GIL-holding render of 9 MB prompts held `/health` for seconds): the ids are the library's own, however long the runs.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time

import pytest

from ossrun import harmony
from ossrun.harmony import render, tokenizer

CODE = '''def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint({"a": [1, 2.5, None]})\n'''


def corpus() -> list[str]:
    rng = random.Random(7)
    pool = "abcxyzABC019 _-.,;:!?'\"()[]{}<>|/\\\n\t éüßçøñ日本語中文한국어🙂👍🏽\u200d\u0301"
    texts = [
        "Hello, world!", "The quick brown fox jumps over the lazy dog. " * 40, CODE * 10,
        "日本語のテキストと中文文本，还有한국어 문장。" * 20, "emoji 🙂👍🏽👨‍👩‍👧 and combining é (e\u0301)" * 10,
        "1234567890 3.14159 -42 1e10 0xFF " * 30, "\n\n\t  \r\n   \n" * 20, "<|start|>user<|message|>hi<|end|>" * 5,
        "https://example.com/a/very/long/path?with=query&and=more#fragment " * 10,
        base64.b64encode(bytes(range(256)) * 1).decode(),  # 344 characters, no space
        "word" * 127, "a" * 511, " " * 511 + "x", "Straße" * 80, "a" * 700, " " * 600 + "x", "x" * 3000,
        '{"name":"manager","role":"viewer","id":12345}' * 20,  # compact JSON: one 900-character run
    ]
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 3000))) for _ in range(60)]
    return texts


def library_encode(text: str, allow_special: bool) -> list[int]:
    enc = tokenizer.get_encoding()
    return enc.encode(text, allowed_special="all") if allow_special else enc.encode(text, allowed_special=set(), disallowed_special=())


@pytest.mark.parametrize("allow_special", [False, True])
def test_normal_text_keeps_the_library_ids(allow_special):
    for text in corpus():
        assert harmony.encode(text, allow_special=allow_special) == library_encode(text, allow_special)


@pytest.mark.parametrize("text", ["x" * 200_000, " " * 200_000, "ab" * 50_000 + " tail", "a<|start|>" * 30_000,
                                  "日" * 100_000, "word " * 100 + "y" * 5000 + "\n" + "z" * 3000])
def test_long_runs_are_encoded_whole_in_linear_time(text):
    """No chunks: a long run's ids are the library's (checked on its first 4,000 characters, where the library's
    quadratic encoder is still quick), and 200,000 characters take well under the minutes the library took."""
    started = time.perf_counter()
    ids = harmony.encode(text, allow_special=True)
    assert time.perf_counter() - started < 5
    assert harmony.decode(ids) == text
    if "<|start|>" in text:
        assert ids.count(harmony.START) == text.count("<|start|>")
    head = text[:4000]
    assert harmony.encode(head, allow_special=True) == library_encode(head, True)


def conversations() -> list[dict]:
    texts = corpus()
    return [
        {"prompt": texts[1]},
        {"messages": [{"role": "system", "content": texts[2]}, {"role": "user", "content": texts[3]},
                      {"role": "assistant", "content": texts[4]}, {"role": "user", "content": texts[7]}]},
        {"messages": [{"role": "developer", "content": texts[9]}, {"role": "user", "content": [{"type": "text", "text": t} for t in texts[10:13]]}]},
        {"input": texts[20], "instructions": texts[21]},
        *({"messages": [{"role": "user", "content": t}]} for t in texts[14:40]),
    ]


class LibraryOnly:
    """No stand-ins: every text goes into the library's rendering, as before hunt_security #8."""

    def instructions(self, instructions: list[str]) -> str:
        return "\n\n".join(instructions)

    def message(self, message):
        return message

    def tools(self, tools):
        return tools

    def splice(self, ids: list[int]) -> list[int]:
        return ids


def edge_conversations() -> list[dict]:
    """Instructions whose ends meet the heading, each other and the tools inside one encoder call."""
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather.\n\n  In a city ",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    ends = ["Be brief.", "Be brief. ", "  lead and trail  ", "\n\nnewlines\n\n", "ends with !!!", "", " ", "\t",
            "'s contraction", "123", "日本語", "emoji 🙂", " " * 300, "a" * 300 + " " * 200]
    bodies = [{"messages": [{"role": "system", "content": a}, {"role": "developer", "content": b},
                            {"role": "user", "content": "Hi"}], "tools": [tool]} for a in ends for b in ends[::3]]
    bodies += [{"input": "Hi", "instructions": e} for e in ends]
    bodies += [{"messages": [{"role": "system", "content": e}, {"role": "user", "content": e}]} for e in ends]
    return bodies


def tool_runs() -> list[dict]:
    """Long runs in every text of a tool the library writes (and in `pattern`, which it does not)."""
    run, blank, other = "x" * 700, " \t" * 200, "q\"\\" * 150
    schema = {"type": "object", "properties": {
        "plain": {"type": "string", "description": "before " + run + " after\nsecond line " + other},
        run: {"type": "string", "enum": [run, "b", other]},
        "spaced": {"type": "string", "description": "a" + blank + "b", "default": run, "examples": [other]},
        "pat": {"type": "string", "pattern": "^(" + "|".join(["ab"] * 200) + ")$"}}, "required": [run, "plain"]}
    tool = {"type": "function", "function": {"name": "get_weather", "description": run + "\n\n" + blank + "end", "parameters": schema}}
    other_tool = {"type": "function", "function": {"name": "search", "description": "glued\x00" + run + "é" + blank,
                                                   "parameters": {"type": "object"}}}  # markers spelled by other tokens
    return [{"messages": [{"role": "user", "content": "Hi"}], "tools": [tool, other_tool]},
            {"messages": [{"role": "system", "content": "Be brief. " + run}, {"role": "user", "content": "Hi"}], "tools": [tool]},
            {"input": "Hi", "instructions": "Use it.", "tools": [{"type": "function", "name": "f", "description": run,
                                                                  "parameters": {"type": "object", "properties": {"p": {"type": "string", "pattern": run}}}}]}]


def test_rendering_gives_the_library_ids(monkeypatch):
    """Texts stood in for by markers and encoded apart give exactly the library's own rendering of the conversation,
    tools, instructions, long runs (a schema's compact response format section, a minified tool result: hunt_render
    #2, where the chunks gave "man" + "ager") and their joins included."""
    rows = json.dumps([{"id": i, "name": "manager", "active": True} for i in range(12)], separators=(",", ":"))
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(14)}}
    long_runs = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": rows}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": rows}]},
                 {"input": "Hi", "instructions": "Use this: " + rows}]
    bodies = conversations() + edge_conversations() + long_runs + tool_runs()
    assert len(bodies) > 100
    section = render.ResponseFormatSection(schema)
    stood_in = [render.render_request(body).token_ids for body in bodies]
    stood_in.append(render.render_request({"messages": [{"role": "user", "content": "Hi"}]}, response_format=section).token_ids)
    monkeypatch.setattr(render, "StandIns", LibraryOnly)
    library = [render.render_request(body).token_ids for body in bodies]
    library.append(render.render_request({"messages": [{"role": "user", "content": "Hi"}]}, response_format=section).token_ids)
    assert library == stood_in


def test_the_library_renders_no_text_of_the_request(monkeypatch):
    """The library renders (holding the GIL) the frame only: markers stand in for the texts, however long."""
    handed: list[int] = []
    library = render._render
    monkeypatch.setattr(render, "_render", lambda conversation: handed.append(len(conversation.to_json())) or library(conversation))
    text = "hello " * 100_000
    ids = render.render_request({"messages": [{"role": "system", "content": text}, {"role": "user", "content": text},
                                              {"role": "assistant", "content": text}, {"role": "user", "content": text}]})
    assert handed and max(handed) < 2000 and len(ids.token_ids) > 400_000


def test_encoding_lets_other_threads_run():
    """The harmony library's encoder holds the GIL (1.5 s for 9 MB); the one `encode` uses does not."""
    text = "hello " * 1_000_000
    harmony.encode("warm up")
    ticks, done = [], threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.05)
    try:
        started = time.perf_counter()
        assert len(harmony.encode(text)) == 1_000_001
        took = time.perf_counter() - started
    finally:
        done.set()
        ticker.join()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert max(gaps) < max(0.3, took / 2), f"the other thread waited {max(gaps):.2f}s of {took:.2f}s"


@pytest.mark.parametrize("body", [{"prompt": "x" * 200_000}, {"messages": [{"role": "system", "content": "s" * 100_000},
                                                                            {"role": "user", "content": "hi " + " " * 100_000 + "x" * 100_000}]},
                                  {"input": "y" * 200_000, "instructions": "z" * 50_000},
                                  {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {
                                      "name": "f", "description": "x" * 200_000, "parameters": {"type": "object", "properties": {
                                          "a": {"type": "string", "description": " " * 200_000, "enum": ["y" * 200_000]}}}}}]}])
def test_long_conversations_render_in_linear_time(body):
    """200,000-character runs, in messages, instructions and tools' texts (the library alone: 14 s for the tool's
    description, quadratic in the run)."""
    started = time.perf_counter()
    ids = render.render_request(body).token_ids
    assert time.perf_counter() - started < 5  # the library alone: minutes
    assert ids[-2:] == [harmony.START, harmony.encode("assistant")[0]]
    text = harmony.decode(ids)
    for part in ("x" * 1000, "s" * 1000, "y" * 1000, "z" * 1000):
        assert (part in text) == (part[0] * 50_000 in str(body))
