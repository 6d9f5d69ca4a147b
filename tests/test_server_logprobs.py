"""Logprobs on /v1/chat/completions through the real server with the openai client, sync and streamed.

Streamed chunks used to carry `logprobs: null`, and a sync answer lost the logprobs of every token
whose text the harmony parser showed only later (it holds text until it knows it is no header).
The check: the tokens' bytes put together are the answer's text. The random model writes no harmony
header, so its text begins right after the prompt's `assistant`: the whitespace it starts with is the
answer's too (it was dropped from the content while its token's entry kept it, so the entries spelled
text the answer did not have).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server_util import MODEL, post_json, start_server

ASK = {"model": MODEL, "messages": [{"role": "user", "content": "Say something"}], "max_tokens": 24, "temperature": 0,
       "logprobs": True, "top_logprobs": 2}


@pytest.fixture(scope="module")
def client(checkpoints, tmp_path_factory):
    server = start_server(checkpoints["original"], tmp_path_factory.mktemp("data-logprobs"), "--rate-limit", "100000")
    yield openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
    server.stop()


def text_of(entries) -> str:
    return b"".join(bytes(entry.bytes) for entry in entries).decode("utf-8", "replace")


def test_sync_logprobs_cover_every_token_of_the_answer(client):
    choice = client.chat.completions.create(**ASK).choices[0]
    entries = choice.logprobs.content
    assert choice.message.content and text_of(entries) == choice.message.content
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in entries)
    assert entries[0].top_logprobs[0].logprob >= entries[0].top_logprobs[1].logprob


def test_streamed_chunks_carry_their_tokens_logprobs(client):
    sync = client.chat.completions.create(**ASK).choices[0]
    chunks = [c for c in client.chat.completions.create(**ASK, stream=True) if c.choices]
    with_text = [c.choices[0] for c in chunks if c.choices[0].delta.content]
    assert with_text and all(choice.logprobs is not None for choice in with_text)
    entries = [entry for choice in with_text for entry in choice.logprobs.content]
    assert "".join(choice.delta.content for choice in with_text) == sync.message.content == text_of(entries)
    assert [e.token for e in entries] == [e.token for e in sync.logprobs.content]


def test_chat_logprobs_carry_refusal_null_as_openai_requires(client):
    """Hunt round 13 A-F1: `logprobs` was `{"content": [...]}` alone; OpenAI's schema requires `refusal` beside it (null
    here: gpt-oss writes no refusal part), sync and in every streamed chunk that has logprobs."""
    sync = client.chat.completions.with_raw_response.create(**ASK).http_response.json()
    assert sync["choices"][0]["logprobs"]["refusal"] is None and sync["choices"][0]["logprobs"]["content"]
    chunks = httpx.post(f"{client.base_url}chat/completions", json={**ASK, "stream": True}, timeout=120).text.splitlines()
    frames = [json.loads(line[6:]) for line in chunks if line.startswith("data: {")]
    carried = [f["choices"][0]["logprobs"] for f in frames if f["choices"] and f["choices"][0].get("logprobs")]
    assert carried and all(set(logprobs) == {"content", "refusal"} and logprobs["refusal"] is None for logprobs in carried)


def test_logprobs_of_a_header_read_as_the_answer_spell_all_of_it(client):
    """Hunt round 17 B-F1: seeded and biased towards `<|channel|>`, the model writes its text with no header and
    `<|channel|>`s in it (` Mannheimлаша emoções<|channel|>OTIONასა…<|channel|>.artist`): no `<|message|>` ever
    comes, so all of it is read as the answer, the specials dropped. Each special token cleared the tokens still
    waiting for their text, so the entries spelled only `.artist`, sync and streamed. Since hunt round 22 A-F2 the plain
    answer's grammar no longer lets the model write `<|channel|>` into header-less text (it writes other tokens there,
    ` Mannheimлаша emoções Purdue…`); the hidden-special case is kept by the scripted test in test_api_surfaces.py
    (`test_logprobs_of_a_salvaged_header_hold_the_text_on_both_sides_of_its_special`). Here: a header-less text cut by
    max_tokens is the answer, and its entries spell all of it, one a token, sync and streamed."""
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "seed": 1, "temperature": 1.0,
           "logit_bias": {"200005": 12}, "logprobs": True}
    sync = client.chat.completions.create(**ask)
    content, entries = sync.choices[0].message.content, sync.choices[0].logprobs.content
    assert sync.choices[0].finish_reason == "length" and len(entries) == sync.usage.completion_tokens
    assert content and text_of(entries) == content
    chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices and c.choices[0].logprobs]
    assert [e.token for c in chunks for e in c.logprobs.content] == [e.token for e in entries]


TEXT = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "logprobs": 2}


def test_completions_logprobs_sync_and_streamed(client):
    choice = client.completions.create(**TEXT).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert all(len(top) <= 2 and max(top.values()) >= logprob for top, logprob in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = [c.choices[0] for c in client.completions.create(**TEXT, stream=True) if c.choices and c.choices[0].text]
    assert all(c.logprobs is not None for c in chunks)
    assert [t for c in chunks for t in c.logprobs.tokens] == lp.tokens
    assert [o for c in chunks for o in c.logprobs.text_offset] == lp.text_offset


@pytest.mark.parametrize("forced, offsets", [({"126": 100}, [0, 1, 2, 3]), ({"126": 100, "227": 100}, None)])
def test_completions_text_offset_counts_each_invalid_byte_as_its_own_character(client, forced, offsets):
    """Before: a lone lead byte (token 126 is b"\\xc2") decodes to U+FFFD only when the next byte arrives, so each
    offset lagged a token: [0, 0, 1, 2] for four of them. Each invalid byte is its own U+FFFD in `text`."""
    args = dict(model=MODEL, prompt="Hi", max_tokens=4, temperature=0, logprobs=1, logit_bias=forced)
    choice = client.completions.create(**args).choices[0]
    lp = choice.logprobs
    expected = [len(b"".join(bytes(_token_bytes(t)) for t in lp.tokens[:i]).decode("utf-8", "replace"))
                for i in range(len(lp.tokens))]
    assert lp.text_offset == expected and (offsets is None or lp.text_offset == offsets)
    # max_tokens cuts after a lone lead byte, which may still begin a character: it is dropped (hunt round 21 B-F2)
    assert choice.text == "\ufffd" * (len(lp.tokens) - 1)
    streamed = [c.choices[0].logprobs for c in client.completions.create(**args, stream=True) if c.choices and c.choices[0].logprobs]
    assert [o for lp_chunk in streamed for o in lp_chunk.text_offset] == lp.text_offset


def _token_bytes(token: str) -> bytes:
    """A legacy `tokens` entry's bytes: `bytes:\\xNN…` for a piece of a character, else its text."""
    return bytes.fromhex(token[len("bytes:"):].replace("\\x", "")) if token.startswith("bytes:") else token.encode()


@pytest.mark.parametrize("n", [0, 1])
def test_completions_top_logprobs_hold_the_sampled_token(client, n):
    """OpenAI's legacy completions "always return the logprob of the sampled token, so there may be up to logprobs+1
    elements": a token sampled outside the top N used to be missing (scoring code reading `top[tokens[i]]` failed)."""
    ask = {**TEXT, "temperature": 2.0, "seed": 4, "logprobs": n}
    lp = client.completions.create(**ask).choices[0].logprobs
    assert all(top[token] == logprob and len(top) <= n + 1
               for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    assert any(len(top) == n + 1 for top in lp.top_logprobs)  # sampled outside the top N (the random model, at T=2)
    chunks = [c.choices[0] for c in client.completions.create(**ask, stream=True) if c.choices and c.choices[0].text]
    assert [t for c in chunks for t in c.logprobs.top_logprobs] == lp.top_logprobs


def test_completions_refuse_chat_top_logprobs_naming_logprobs(client):
    """Before: `/v1/completions` took chat's `top_logprobs` (its document listed it, 21 was a 400) and dropped it: no
    alternatives, no error (hunt round 19 A-F2). OpenAI's legacy completions have no such field (`logprobs: N` is the
    top N there), so it is a 400 saying so; null is accepted, and the document types it null."""
    for extra in ({"top_logprobs": 5}, {"logprobs": 1, "top_logprobs": 5}, {"top_logprobs": 0}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body=extra)
        assert "at '/top_logprobs'" in caught.value.message and "logprobs: N" in caught.value.message
        assert caught.value.body["param"] == "top_logprobs"
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"top_logprobs": None}).choices
    document = httpx.get(f"{str(client.base_url).removesuffix('/v1/')}/openapi.json").json()
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert document["components"]["schemas"][body.split("/")[-1]]["properties"]["top_logprobs"]["type"] == "null"


def test_completions_logprobs_match_the_text_special_tokens_included(demo_server):
    """`/v1/completions` shows harmony's special tokens in its text; their logprobs used to be left out, so
    `tokens` did not add up to `text` and every `text_offset` was off (the demo model answers with a header)."""
    demo = openai.OpenAI(base_url=f"{demo_server.base}/v1", api_key="secret", max_retries=0)
    ask = {"model": MODEL, "prompt": "<|start|>user<|message|>Hi<|end|><|start|>assistant", "max_tokens": 8, "temperature": 0,
           "logprobs": 0}
    answer = demo.completions.create(**ask)
    choice, lp = answer.choices[0], answer.choices[0].logprobs
    ended = choice.finish_reason == "stop"  # the token that ends generation (<|return|>) is not in the text, nor here
    assert "<|channel|>" in choice.text and len(lp.tokens) == answer.usage.completion_tokens - ended
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = [c.choices[0] for c in demo.completions.create(**ask, stream=True) if c.choices and c.choices[0].text]
    assert [t for c in chunks for t in c.logprobs.tokens] == lp.tokens
    assert [o for c in chunks for o in c.logprobs.text_offset] == lp.text_offset


def test_prompt_shape_returns_the_logprobs_its_schema_offers(demo_server):
    """`/ai/run`'s Prompt shape lists `logprobs` and `top_logprobs` in its schema; they were accepted and never
    returned. Its result carries them as a Messages choice does (`logprobs.content`), and each streamed text frame
    its own tokens'; without `logprobs: true` the answer is as it was."""
    path = demo_server.run_url()[len(demo_server.base):]
    body = {"prompt": "What is the capital of France?", "max_tokens": 64, "logprobs": True, "top_logprobs": 2}
    result = post_json(demo_server, path, body)["result"]
    entries = result["logprobs"]["content"]
    assert result["response"] == "The capital of France is Paris."
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == result["response"]
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"] == e["token"] for e in entries)
    with httpx.stream("POST", demo_server.base + path, json={**body, "temperature": 0, "stream": True}, headers=demo_server.headers,
                      timeout=120) as response:
        frames = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    texts = [f for f in frames if f["response"]]
    assert texts and all(f["logprobs"]["content"] for f in texts)
    assert [e for f in texts for e in f["logprobs"]["content"]] == entries
    assert "logprobs" not in post_json(demo_server, path, {**body, "logprobs": None})["result"]


def test_a_tiny_repetition_penalty_answers_with_finite_logprobs(client):
    """Before: a 500 (schemathesis): `repetition_penalty` 7e-39 (in range) made +inf logits and NaN logprobs, which
    no JSON answer can carry."""
    choice = client.chat.completions.create(**ASK, extra_body={"repetition_penalty": 7e-39}).choices[0]
    assert all(entry.logprob <= 0 and all(t.logprob <= 0 for t in entry.top_logprobs) for entry in choice.logprobs.content)
