"""Bounded tokenisation: pathological runs are cut into chunks, everything else keeps its exact ids.

One pre-tokenizer piece costs the library time quadratic in its length while it holds the GIL;
`"x" * 200000` took minutes and froze the server. These tests pin both halves of the fix: normal
text (any run shorter than MAX_RUN) gives the library's own ids, and no library call ever sees more
than MAX_RUN characters of a long run, in raw prompts and in rendered conversations alike.
"""

from __future__ import annotations

import base64
import random
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


class Recorder:
    """The library's encoding, recording the longest text any single call was given."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.inner.encode(text, **kwargs)


@pytest.mark.parametrize("text", ["x" * 200_000, " " * 200_000, "ab" * 50_000 + " tail", "a<|start|>" * 30_000,
                                  "日" * 100_000, "word " * 100 + "y" * 5000 + "\n" + "z" * 3000])
def test_long_runs_are_encoded_in_bounded_calls(monkeypatch, text):
    recorder = Recorder(tokenizer.get_encoding())
    monkeypatch.setattr(tokenizer, "get_encoding", lambda: recorder)
    started = time.perf_counter()
    ids = harmony.encode(text, allow_special=True)
    assert time.perf_counter() - started < 5  # unbounded: minutes for the 200 000-character runs
    assert recorder.longest <= tokenizer.MAX_RUN
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


def test_stand_ins_splice_exactly(monkeypatch):
    """Standing every text in for a marker (as long texts are) gives the library's own rendering."""
    plain = [render.render_request(body).token_ids for body in conversations()]
    monkeypatch.setattr(render, "has_long_run", lambda text: True)
    assert [render.render_request(body).token_ids for body in conversations()] == plain


@pytest.mark.parametrize("body", [{"prompt": "x" * 200_000}, {"messages": [{"role": "system", "content": "s" * 100_000},
                                                                            {"role": "user", "content": "hi " + " " * 100_000 + "x" * 100_000}]},
                                  {"input": "y" * 200_000, "instructions": "z" * 50_000}])
def test_long_conversations_render_in_bounded_calls(monkeypatch, body):
    recorder = Recorder(tokenizer.get_encoding())
    monkeypatch.setattr(tokenizer, "get_encoding", lambda: recorder)
    started = time.perf_counter()
    ids = render.render_request(body).token_ids
    assert time.perf_counter() - started < 5
    assert recorder.longest <= tokenizer.MAX_RUN
    assert ids[-2:] == [harmony.START, harmony.encode("assistant")[0]]
    text = harmony.decode(ids)
    for part in ("x" * 1000, "s" * 1000, "y" * 1000, "z" * 1000):
        assert (part in text) == (part[0] * 50_000 in str(body))
