"""The Responses API on the real server and the demo model, as the openai SDK uses it: an answer cut inside
its reasoning, logprobs of the answer text, and the stored responses' `delete` and `input_items`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server_util import MODEL

GERMANY = "What is the capital of Germany?"


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


def post(server, path: str, body: dict) -> dict:
    response = httpx.post(server.base + path, json={"temperature": 0, **body}, headers=server.headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def events(server, body: dict) -> list[dict]:
    out = []
    with httpx.stream("POST", f"{server.base}/v1/responses", json={"temperature": 0, **body, "stream": True},
                      headers=server.headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[len("data: "):]))
    return out


def test_cut_inside_the_reasoning_outputs_only_the_reasoning(server):
    """As OpenAI answers "ran out of tokens during reasoning": no message the model never started."""
    body = {"model": MODEL, "input": GERMANY, "max_output_tokens": 20}
    result = post(server, "/v1/responses", body)
    assert result["status"] == "incomplete" and result["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [item["type"] for item in result["output"]] == ["reasoning"] and result["output_text"] == ""
    streamed = events(server, body)
    kinds = {e["type"] for e in streamed}
    assert not kinds & {"response.content_part.added", "response.output_text.done", "response.content_part.done"}
    assert [e["item"]["type"] for e in streamed if e["type"] == "response.output_item.added"] == ["reasoning"]
    assert streamed[-1]["type"] == "response.incomplete"
    assert [item["type"] for item in streamed[-1]["response"]["output"]] == ["reasoning"]
    again = post(server, "/v1/responses", {"model": MODEL, "input": "What is 2 + 3?", "previous_response_id": result["id"]})
    assert again["status"] == "completed" and again["output_text"]
