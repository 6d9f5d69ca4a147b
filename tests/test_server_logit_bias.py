"""`logit_bias` through the real server with the openai client: it changes what greedy decoding picks.

It used to be accepted and ignored. The tiny random model's logits span a few units, so +100 puts a
token first and -100 puts it last; a greedy request with two tokens at +100 picks one of them, and
banning that one leaves the other.
"""

from __future__ import annotations

import openai
import pytest

from ossrun import harmony
from tests.server_util import MODEL, start_server

PROMPT = "<|start|>user<|message|>Capital of Peru?<|end|><|start|>assistant<|channel|>final<|message|>"


@pytest.fixture(scope="module")
def client(checkpoints, tmp_path_factory):
    server = start_server(checkpoints["original"], tmp_path_factory.mktemp("data-bias"), "--rate-limit", "100000")
    yield openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0)
    server.stop()


def token(text: str) -> int:
    (token_id,) = harmony.encode(text)
    return token_id


def complete(client, bias: dict[int, int], **extra) -> str:
    args = {"temperature": 0, **extra, "logit_bias": {str(t): b for t, b in bias.items()}}
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, **args).choices[0].text


def test_plus_100_forces_a_token_and_minus_100_bans_the_greedy_pick(client):
    lima, paris = token(" Lima"), token(" Paris")
    assert complete(client, {lima: 100}) == " Lima"
    assert complete(client, {paris: 100}) == " Paris"
    first = complete(client, {lima: 100, paris: 100})
    assert first in (" Lima", " Paris")
    other = " Paris" if first == " Lima" else " Lima"
    assert complete(client, {lima: 100, paris: 100, token(first): -100}) == other
    assert complete(client, {lima: 100}, temperature=1.0, top_p=0.9, seed=3) == " Lima"  # sampled rows too


def test_chat_ends_at_once_on_a_return_token_forced_by_the_bias(client):
    messages = [{"role": "user", "content": "Capital of Peru?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].finish_reason == "length"  # the random model never ends by itself
    args = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0, logit_bias={str(harmony.RETURN): 100})
    reply = client.chat.completions.create(**args)
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 1
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop" and chunks[-1].usage.completion_tokens == 1


def test_a_token_outside_the_vocabulary_is_a_400_naming_logit_bias(client):
    with pytest.raises(openai.BadRequestError, match="logit_bias/201088.*outside the vocabulary"):
        complete(client, {201088: 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], logit_bias={"7": 101})


def test_min_p_cuts_the_sampled_tokens_to_those_near_the_top_one(client):
    """Before: `min_p` (vLLM's extension) was accepted and ignored. The random model's distribution is flat, so at
    temperature 2 seeded samples wander; with min_p 1 only the top token is left, so every sample is greedy's."""
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=2.0, n=4, seed=5)
    wandering = client.completions.create(**args).choices
    assert any(c.text != greedy for c in wandering)
    cut = client.completions.create(**args, extra_body={"min_p": 1.0}).choices
    assert [c.text for c in cut] == [greedy] * 4
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Capital of Peru?"}], max_tokens=6, n=2, seed=5)
    greedy_chat = client.chat.completions.create(**{**chat, "n": 1}, temperature=0).choices[0].message.content
    cut_chat = client.chat.completions.create(**chat, temperature=2.0, extra_body={"min_p": 1.0}).choices
    assert [c.message.content for c in cut_chat] == [greedy_chat] * 2
    with pytest.raises(openai.BadRequestError, match="min_p"):
        client.completions.create(**args, extra_body={"min_p": 1.5})
    with pytest.raises(openai.BadRequestError, match="min_p is not a Responses parameter"):
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, extra_body={"min_p": 0.1})


def test_two_keys_naming_one_token_are_a_400_naming_the_second_key(client):
    """Before: `{"1": 5, "01": -5}` (both keys match the documented pattern and name token 1) was a 400 naming no field
    (`param: null`) and neither key, from the engine's own check (hunt round 19 A-F1)."""
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    for bias, key in (({"1": 5, "01": -5}, "01"), ({"007": 1, "7": 2}, "7")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**chat, logit_bias=bias)
        assert f"at '/logit_bias/{key}'" in caught.value.message and "token id" in caught.value.message
        assert caught.value.body["param"] == f"logit_bias.{key}"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, logit_bias={"1": 5, "0001": 5})
    assert caught.value.body["param"] == "logit_bias.0001"
    with pytest.raises(openai.BadRequestError) as caught:  # the vocabulary's 400 names the key as the schema's do
        complete(client, {201088: 1})
    assert caught.value.body["param"] == "logit_bias.201088"
    assert complete(client, {token(" Lima"): 100}) == " Lima"  # one key per token is still served


def test_v1_top_k_minus_one_and_zero_are_off_as_vllm_reads_them(client):
    """Before: `/v1` held vLLM's `top_k` extension to Workers AI's 1..50, so a vLLM client's explicit "off" (-1, 0) was
    a 400 (hunt round 19 A-F4). Now they sample exactly as no top_k does; 1..50 still cut, and the rest stays a 400
    naming the field. `/ai/run` keeps Workers AI's range (its 400 for 0 is tested in test_server.py)."""
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=2.0, n=4, seed=5)
    free = [c.text for c in client.completions.create(**args).choices]
    for off in (-1, 0):
        assert [c.text for c in client.completions.create(**args, extra_body={"top_k": off}).choices] == free
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    assert [c.text for c in client.completions.create(**args, extra_body={"top_k": 1}).choices] == [greedy] * 4
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Capital of Peru?"}], max_tokens=6, n=2, seed=5, temperature=2.0)
    free_chat = [c.message.content for c in client.chat.completions.create(**chat).choices]
    assert [c.message.content for c in client.chat.completions.create(**chat, extra_body={"top_k": -1}).choices] == free_chat
    for bad in (-2, 51):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**chat, extra_body={"top_k": bad})
        assert caught.value.body["param"] == "top_k"
