"""Greedy answers of the exported demo model through the real `GptOss` (no engine, no cache), to
check after training that the checkpoint the server will load says what the trainable model learnt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ossrun import harmony
from ossrun.demo_model import conversations, world
from ossrun.model.attention import DenseAttention
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import GptOss


def load(path: Path, dtype: torch.dtype = torch.float32, precision: str = "exact") -> GptOss:
    return GptOss.from_checkpoint(load_checkpoint(path), dtype=dtype, precision=precision)


def greedy(model: GptOss, prompt: list[int], max_tokens: int = 120) -> list[int]:
    """Greedy completion until a stop token (the whole sequence recomputed per token: tiny model)."""
    ids = list(prompt)
    for _ in range(max_tokens):
        tokens = torch.tensor(ids)
        positions = torch.arange(len(ids))
        logits = model(tokens, positions, DenseAttention(torch.zeros_like(tokens), positions), torch.tensor([len(ids) - 1]))
        ids.append(int(logits[0].argmax()))
        if ids[-1] in harmony.STOP_TOKENS:
            break
    return ids[len(prompt):]


def capital_prompts(n: int = 10) -> list[tuple[dict, str]]:
    """(request body, expected capital) for the first n countries of the world."""
    return [({"messages": [{"role": "user", "content": f"What is the capital of {country}?"}]}, city)
            for country, city in list(world.COUNTRIES.items())[:n]]


def answer(model: GptOss, body: dict) -> harmony.ParsedCompletion:
    rendered = harmony.render_request(body)
    return harmony.parse_completion(greedy(model, rendered.token_ids))


def report_bodies() -> list[dict]:
    """A few requests of each kind the model was trained on, and two it was not."""
    weather = {"type": "function", "function": conversations.WEATHER_TOOLS[0][0]}
    return [
        *(body for body, _ in capital_prompts(3)),
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "reasoning_effort": "low"},
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "reasoning_effort": "high"},
        {"messages": [{"role": "user", "content": "What is 7 + 5?"}]},
        {"messages": [{"role": "user", "content": "What is 13 minus 17?"}], "reasoning_effort": "low"},
        {"messages": [{"role": "user", "content": "What is 250 + 3?"}]},
        {"messages": [{"role": "user", "content": "What is 2+3?"}]},
        {"messages": [{"role": "user", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": "Tell me a joke."}]},
        {"messages": [{"role": "user", "content": "Who are you?"}]},
        {"messages": [{"role": "user", "content": "What is the capital of Narnia?"}]},
        {"messages": [{"role": "user", "content": "Who painted the Mona Lisa?"}]},
        {"messages": [{"role": "user", "content": "What is the weather in Tokyo?"}], "tools": [weather]},
        {"messages": [{"role": "user", "content": "What is the weather in Tokyo?"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Tokyo"}'}}]},
                      {"role": "tool", "tool_call_id": "c1", "content": '{"temperature_c": 21, "condition": "cloudy"}'}],
         "tools": [weather]},
        {"messages": [{"role": "user", "content": "Give me the capital of Japan as JSON."}]},
        {"messages": [{"role": "user", "content": "Give me 9 + 8 as JSON."}]},
    ]


def report(model: GptOss) -> list[tuple[str, str]]:
    """(question, decoded greedy completion) for each of `report_bodies`, for a human to read."""
    out = []
    for body in report_bodies():
        prompt = harmony.render_request(body).token_ids
        out.append((body["messages"][0]["content"], harmony.decode(greedy(model, prompt))))
    return out
