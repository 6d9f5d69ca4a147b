"""`n > 1` through the real server with the openai client: indexed choices, sync and streamed,
seeded per choice so a seeded request is reproducible and its choices differ."""

from __future__ import annotations

import threading

import openai
import pytest

from tests.server_util import MODEL, start_server

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Write a line"}], "max_tokens": 8, "temperature": 1.0, "seed": 7}
TEXT = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 11}


@pytest.fixture(scope="module")
def client(checkpoints, tmp_path_factory):
    server = start_server(checkpoints["original"], tmp_path_factory.mktemp("data-choices"), "--rate-limit", "100000")
    yield openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
    server.stop()


def streamed_texts(chunks, n: int, field) -> tuple[list[str], list[str | None]]:
    texts, finishes = [""] * n, [None] * n
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += field(choice) or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    return texts, finishes


def test_chat_n_choices_sync_and_streamed(client):
    first = client.chat.completions.create(**CHAT, n=2)
    again = client.chat.completions.create(**CHAT, n=2)
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.message.content for c in first.choices]
    assert texts[0] != texts[1] and texts == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens == 16 and first.usage.total_tokens == first.usage.prompt_tokens + 16
    chunks = list(client.chat.completions.create(**CHAT, n=2, stream=True, stream_options={"include_usage": True}))
    streamed, finishes = streamed_texts(chunks, 2, lambda c: c.delta.content)
    assert streamed == texts and finishes == ["length", "length"]
    assert len({c.id for c in chunks}) == 1 and chunks[-1].usage.completion_tokens == 16


def test_completions_n_choices_sync_and_streamed(client):
    first = client.completions.create(**TEXT, n=3)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) == 3 and texts == [c.text for c in client.completions.create(**TEXT, n=3).choices]
    streamed, finishes = streamed_texts(list(client.completions.create(**TEXT, n=3, stream=True)), 3, lambda c: c.text)
    assert streamed == texts and finishes == ["length"] * 3


def test_completions_prompt_list_is_one_group_of_choices_per_prompt(client):
    """A list of prompts used to be joined into one prompt (one choice): now each prompt has its n choices,
    index = prompt_index * n + i, each as if its prompt were sent alone; usage sums over the prompts."""
    prompts = ["Once upon a time", "Tell me"]
    alone = [client.completions.create(**{**TEXT, "prompt": p}, n=2) for p in prompts]
    both = client.completions.create(**{**TEXT, "prompt": prompts}, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [c.text for one in alone for c in one.choices]
    assert both.usage.prompt_tokens == sum(one.usage.prompt_tokens for one in alone)
    assert both.usage.completion_tokens == 4 * 8 and both.usage.total_tokens == both.usage.prompt_tokens + 32
    assert both.usage.model_extra["cost_usd"] == pytest.approx(sum(one.usage.model_extra["cost_usd"] for one in alone))
    chunks = list(client.completions.create(**{**TEXT, "prompt": prompts}, n=2, stream=True, stream_options={"include_usage": True}))
    streamed, finishes = streamed_texts(chunks, 4, lambda c: c.text)
    assert streamed == [c.text for c in both.choices] and finishes == ["length"] * 4
    assert chunks[-1].usage.model_dump() == both.usage.model_dump()


def test_completions_refuse_an_empty_prompt_list_and_token_ids(client):
    for prompt in ([], [1, 2, 3], [[1, 2], [3]]):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**{**TEXT, "prompt": prompt})
        assert "/prompt" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(**{**TEXT, "prompt": [1, 2, 3]})


def test_streamed_usage_bills_the_prompt_once_as_the_sync_answer_does(client):
    """Streamed usage used to add every choice's cost, each with the prompt in it (the prompt billed n times)."""
    client.chat.completions.create(**CHAT, n=3)  # both answers below find the prompt in the prefix cache (cached_tokens)
    sync = client.chat.completions.create(**CHAT, n=3).usage
    chunks = list(client.chat.completions.create(**CHAT, n=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.model_dump() == sync.model_dump()
    text_sync = client.completions.create(**TEXT, n=3).usage
    text_chunks = list(client.completions.create(**TEXT, n=3, stream=True, stream_options={"include_usage": True}))
    assert text_chunks[-1].usage.model_dump() == text_sync.model_dump()


def test_completions_echo_puts_the_prompt_before_each_choice(client):
    plain = client.completions.create(**TEXT, n=2)
    echoed = client.completions.create(**TEXT, n=2, echo=True)
    assert [c.text for c in echoed.choices] == [TEXT["prompt"] + c.text for c in plain.choices]
    assert echoed.usage.model_dump() == plain.usage.model_dump()
    streamed, _ = streamed_texts(list(client.completions.create(**TEXT, n=2, echo=True, stream=True)), 2, lambda c: c.text)
    assert streamed == [c.text for c in echoed.choices]


def test_completions_refuse_what_they_cannot_do(client):
    """echo with logprobs needs the prompt's logprobs (not computed here) and suffix is insertion (not gpt-oss's):
    both used to be accepted and ignored."""
    with pytest.raises(openai.BadRequestError, match="prompt logprobs"):
        client.completions.create(**TEXT, echo=True, logprobs=1)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(**TEXT, suffix="The end.")


def test_a_request_with_many_choices_does_not_lock_out_a_request_sent_after_it(checkpoints, tmp_path_factory):
    """Before: the 8 choices (2 prompts × n 4) of one request held both slots (`--max-num-seqs 2`) in turn, and a
    chat request sent after its first token waited for 6 of them to finish (hunt_security #3: 100 s on a server).
    Now each request's choices are one group in the engine, and groups share the slots: the chat request runs at
    once, while most of the big request's tokens are still to come."""
    server = start_server(checkpoints["original"], tmp_path_factory.mktemp("data-fair"), "--rate-limit", "100000",
                          "--max-num-seqs", "2")
    try:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
        big = client.completions.create(**{**TEXT, "prompt": ["Once upon a time", "Tell me"], "max_tokens": 24}, n=4,
                                        stream=True)
        received = [next(iter(big))]
        reader = threading.Thread(target=lambda: received.extend(big))
        reader.start()
        client.chat.completions.create(**{**CHAT, "max_tokens": 2})
        seen_then = len(received)
        reader.join()
        assert seen_then < len(received) / 2, (seen_then, len(received))
    finally:
        server.stop()
