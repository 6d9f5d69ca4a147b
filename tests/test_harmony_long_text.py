"""Bounded tokenisation: pathological runs are cut into chunks, everything else keeps its exact ids.

One pre-tokenizer piece costs the harmony library time quadratic in its length while it holds the GIL;
`"x" * 200000` took minutes and froze the server. These tests pin both halves of that fix: normal
text (any run shorter than MAX_RUN) gives the library's own ids, and no encoder call ever sees more
than MAX_RUN characters of a long run, in raw prompts and in rendered conversations alike.

Texts are encoded by tiktoken, which lets other threads run, and the library renders only the frame around them
(hunt_security #8: its GIL-holding render of 9 MB prompts held `/health` for seconds): the ids are still the
library's own, texts and rendered conversations alike.
"""

from __future__ import annotations

import base64
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
        "word" * 127, "a" * (tokenizer.MAX_RUN - 1), " " * (tokenizer.MAX_RUN - 1) + "x", "Straße" * 80,
    ]
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 3000))) for _ in range(60)]
    return texts


def library_encode(text: str, allow_special: bool) -> list[int]:
    enc = tokenizer.get_encoding()
    return enc.encode(text, allowed_special="all") if allow_special else enc.encode(text, allowed_special=set(), disallowed_special=())


@pytest.mark.parametrize("allow_special", [False, True])
def test_normal_text_keeps_the_library_ids(allow_special):
    for text in corpus():
        assert not tokenizer.has_long_run(text)
        assert harmony.encode(text, allow_special=allow_special) == library_encode(text, allow_special)


def test_the_encoder_gives_the_library_ids_also_for_long_pieces():
    """`encode_unbounded` (tiktoken) is the library's encoding of a whole piece of a prompt, long runs included."""
    rng = random.Random(3)
    texts = corpus() + ["x" * 5000, " " * 3000 + "y", "ab" * 2000, "".join(rng.choice("abc .\n") for _ in range(20_000))]
    for text in texts:
        assert tokenizer.encode_unbounded(text) == library_encode(text, False)


@pytest.mark.parametrize("window", [1, 7, 600, 1 << 18])
def test_long_runs_are_found_window_by_window_as_in_one_search(monkeypatch, window):
    """Long texts are searched for runs a window at a time (`re` holds the GIL while it searches): the same runs."""
    rng = random.Random(window)
    texts = corpus() + ["".join(rng.choice(["x" * rng.randint(1, 1500), " " * rng.randint(1, 1500), "\x1c", "ab", "\n"])
                                for _ in range(rng.randint(1, 40))) for _ in range(40)]
    monkeypatch.setattr(tokenizer, "_WINDOW", window)
    for text in texts:
        assert [m.span() for m in tokenizer._long_runs(text)] == [m.span() for m in tokenizer._LONG_RUN.finditer(text)]


class Recorder:
    """The encoder, recording the longest text any single call was given."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.inner.encode(text, **kwargs)

    def encode_ordinary(self, text):
        self.longest = max(self.longest, len(text))
        return self.inner.encode_ordinary(text)


@pytest.mark.parametrize("text", ["x" * 200_000, " " * 200_000, "ab" * 50_000 + " tail", "a<|start|>" * 30_000,
                                  "日" * 100_000, "word " * 100 + "y" * 5000 + "\n" + "z" * 3000])
def test_long_runs_are_encoded_in_bounded_calls(monkeypatch, text):
    recorder = Recorder(tokenizer.bpe())
    monkeypatch.setattr(tokenizer, "bpe", lambda: recorder)
    started = time.perf_counter()
    ids = harmony.encode(text, allow_special=True)
    assert time.perf_counter() - started < 5  # unbounded: minutes for the 200 000-character runs
    assert 0 < recorder.longest <= tokenizer.MAX_RUN
    assert harmony.decode(ids) == text  # nothing lost or doubled at the chunk edges
    if "<|start|>" in text:  # a special token is never cut in two
        assert ids.count(harmony.START) == text.count("<|start|>")


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


def strings(value) -> list[str]:
    """Every string in a JSON value, in order (a run in any text the body renders is one of their concatenation's)."""
    if isinstance(value, str):
        return [value]
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [text for child in children for text in strings(child)]


class LibraryOnly:
    """No stand-ins: every text goes into the library's rendering, as before hunt_security #8."""

    def text(self, text: str) -> str:
        return text

    def instructions(self, instructions: list[str]) -> str:
        return "\n\n".join(instructions)

    def message(self, message):
        return message

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


def test_rendering_gives_the_library_ids(monkeypatch):
    """Texts stood in for by markers and encoded apart give exactly the library's own rendering of the conversation
    (texts without a pathological run, whose bounded chunks are meant to differ), tools, instructions and their
    joins included."""
    bodies = [body for body in conversations() + edge_conversations() if not tokenizer.has_long_run("".join(strings(body)))]
    assert len(bodies) > 100
    stood_in = [render.render_request(body).token_ids for body in bodies]
    monkeypatch.setattr(render, "StandIns", LibraryOnly)
    assert [render.render_request(body).token_ids for body in bodies] == stood_in


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
                                  {"input": "y" * 200_000, "instructions": "z" * 50_000}])
def test_long_conversations_render_in_bounded_calls(monkeypatch, body):
    recorder = Recorder(tokenizer.bpe())
    monkeypatch.setattr(tokenizer, "bpe", lambda: recorder)
    started = time.perf_counter()
    ids = render.render_request(body).token_ids
    assert time.perf_counter() - started < 5
    assert 0 < recorder.longest <= tokenizer.MAX_RUN
    assert ids[-2:] == [harmony.START, harmony.encode("assistant")[0]]
    text = harmony.decode(ids)
    for part in ("x" * 1000, "s" * 1000, "y" * 1000, "z" * 1000):
        assert (part in text) == (part[0] * 50_000 in str(body))
