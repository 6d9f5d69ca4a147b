"""Synthetic harmony conversations of the demo model's world, as (prompt ids, completion ids) pairs.

Every prompt is rendered by `ossrun.harmony.render_request` from an API request body, so the model
is trained on exactly the tokens the server will feed it (reasoning effort in the system message,
tools in the developer message, earlier turns and tool results as the server renders them). The
completion is what gpt-oss writes after `<|start|>assistant`: an analysis message, then a final
answer or a tool call in the header form the structured-output grammar allows.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

from ossrun import harmony
from ossrun.demo_model import world

EFFORTS = ("low", "medium", "high")
INSTRUCTIONS = ("You are a helpful assistant.", "Answer briefly.", "Be friendly.", "You are a concise assistant.")


@dataclass(frozen=True, slots=True)
class Sample:
    """One training conversation. `prompt` is fed, `completion` is learnt; `unknown` marks out-of-world
    prompts, whose words the model must not memorise (see `vocab.py`)."""

    kind: str
    prompt: list[int]
    completion: list[int]
    unknown: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """What the assistant writes: reasoning per effort, then a final text or a tool call."""

    reasoning: dict[str, str]
    final: str | None = None
    call: tuple[str, dict[str, Any]] | None = None  # (function name, arguments)


# -- tools --------------------------------------------------------------------------------------

WEATHER_TOOLS: tuple[tuple[dict[str, Any], str], ...] = (
    ({"name": "get_weather", "description": "Get the current weather in a city",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}, "city"),
    ({"name": "get_weather", "description": "Get the weather for a location",
      "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "City name"}},
                     "required": ["location"]}}, "location"),
    ({"name": "get_weather", "description": "Current weather",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                      "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                     "required": ["city"]}}, "city"),
)
OTHER_TOOLS: tuple[dict[str, Any], ...] = (
    {"name": "get_time", "description": "Get the current time in a timezone",
     "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}},
    {"name": "search", "description": "Search the web",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
)


def _tools(rng: random.Random, weather: dict[str, Any] | None) -> list[dict[str, Any]]:
    tools = [t for t in OTHER_TOOLS if rng.random() < 0.3]
    if weather is not None:
        tools.insert(rng.randrange(len(tools) + 1), weather)
    return [{"type": "function", "function": t} for t in tools]


# -- replies of each kind of question -------------------------------------------------------------

def _reasoning(low: str, medium: str, high: str) -> dict[str, str]:
    """Longer at higher effort: medium extends low, high extends medium."""
    return {"low": low, "medium": f"{low} {medium}", "high": f"{low} {medium} {high}"}


def _sentence(text: str) -> str:
    """Ends with one period ("Washington, D.C." has its own)."""
    return text if text.endswith(".") else f"{text}."


def capital(rng: random.Random) -> tuple[str, Reply]:
    country, city = rng.choice(list(world.COUNTRIES.items()))
    question = rng.choice(CAPITAL_QUESTIONS).format(country)
    # The fact is recalled in the reasoning at every effort, in the same words as for JSON answers,
    # so every answer copies it from there.
    reasoning = _reasoning(_sentence(f"The user asks for the capital of {country}: it is {city}"),
                           f"{country} is in my list of countries, so I am sure.", "One sentence is enough.")
    return question, Reply(reasoning, final=_sentence(f"The capital of {country} is {city}"))


CAPITAL_QUESTIONS = ("What is the capital of {}?", "What's the capital of {}?", "Capital of {}?",
                     "Which city is the capital of {}?", "Tell me the capital of {}.",
                     "What is the capital city of {}?", "what is the capital of {}")
CAPITAL_JSON_QUESTIONS = ("Give me the capital of {} as JSON.", "Answer in JSON: what is the capital of {}?",
                          "Return JSON with the capital of {}.", "What is the capital of {}? Reply in JSON.",
                          "The capital of {} as JSON, please.")


def capital_json(rng: random.Random, questions: tuple[str, ...] = CAPITAL_JSON_QUESTIONS) -> tuple[str, Reply]:
    country, city = rng.choice(list(world.COUNTRIES.items()))
    question = rng.choice(questions).format(country)
    reasoning = _reasoning(_sentence(f"The user wants JSON with the capital of {country}: it is {city}"),
                           "I write one object with the country and its capital.", "Both values are strings.")
    return question, Reply(reasoning, final=json.dumps({"country": country, "capital": city}, ensure_ascii=False))


def arithmetic_steps(a: int, op: str, b: int) -> str:
    """`a op b` worked out one unit at a time, e.g. 7+5=8+4=…=12+0 and 3-7=2-6=…=0-4.

    Numbers up to 999 are single tokens, so there are no digits to add column by column; instead
    each step moves one unit (the left number's successor or predecessor, the right one's
    predecessor) and copies the pair four tokens back, until a side reaches 0. Every step is a
    lookup in a table of 41 numbers, which a tiny model learns exactly, where the whole sum would
    be a 441-entry table per operation that it only half memorises."""
    steps = [f"{a}{op}{b}"]
    while b > 0 and (op == "+" or a > 0):
        a, b = (a + 1 if op == "+" else a - 1), b - 1
        steps.append(f"{a}{op}{b}")
    return "=".join(steps)


def _numbers(rng: random.Random) -> tuple[int, str, int, str]:
    """(a, op, b, how the question spells op)."""
    op = rng.choice(tuple(world.OPERATIONS))
    low = world.ARITHMETIC_MAX // 2 if rng.random() < 0.3 else 0  # long chains, where a copy can slip, more often
    a, b = rng.randint(low, world.ARITHMETIC_MAX), rng.randint(low, world.ARITHMETIC_MAX)
    if rng.random() < 0.05:  # a - a ends on 0-0, the one pair where both sides stop at once
        b = a
    return a, op, b, rng.choice(world.OPERATION_WORDS[op])


def _asked(rng: random.Random, template: str, a: int, word: str, b: int) -> str:
    """The question with its numbers filled in; a symbol operator is written without spaces ("2+3") in
    some of them, as people type it (the tokens differ: "+" and "3" against " +" and " 3")."""
    if not word.isalpha() and rng.random() < 0.3:
        template = template.replace("{} {} {}", "{}{}{}")
    return template.format(a, word, b)


ARITHMETIC_QUESTIONS = ("What is {} {} {}?", "How much is {} {} {}?", "Compute {} {} {}.", "{} {} {}?",
                        "Calculate {} {} {}.", "What's {} {} {}?", "{} {} {} =")


def arithmetic(rng: random.Random) -> tuple[str, Reply]:
    a, op, b, word = _numbers(rng)
    result = world.OPERATIONS[op](a, b)
    question = _asked(rng, rng.choice(ARITHMETIC_QUESTIONS), a, word, b)
    reasoning = _reasoning(f"The user asks for {a} {op} {b}: {arithmetic_steps(a, op, b)}.",
                           f"So {a} {op} {b} = {result}.", "I counted one step at a time, so it is right.")
    return question, Reply(reasoning, final=f"{a} {op} {b} = {result}.")


ARITHMETIC_JSON_QUESTIONS = ("Give me {} {} {} as JSON.", "Answer in JSON: what is {} {} {}?", "Return JSON with {} {} {}.")


def arithmetic_json(rng: random.Random, questions: tuple[str, ...] = ARITHMETIC_JSON_QUESTIONS) -> tuple[str, Reply]:
    a, op, b, word = _numbers(rng)
    result = world.OPERATIONS[op](a, b)
    question = _asked(rng, rng.choice(questions), a, word, b)
    reasoning = _reasoning(f"The user wants JSON with {a} {op} {b}: {arithmetic_steps(a, op, b)}.",
                           f"So the result is {result}.", "I write one object with the expression and the result.")
    return question, Reply(reasoning, final=json.dumps({"expression": f"{a} {op} {b}", "result": result}))


def arithmetic_limits(rng: random.Random) -> tuple[str, Reply]:
    """A number above the range or another operation: say what the model can do rather than count for ever."""
    if rng.random() < 0.4:
        a, b, word = rng.randint(0, world.ARITHMETIC_MAX), rng.randint(0, world.ARITHMETIC_MAX), rng.choice(world.OTHER_OPERATION_WORDS)
    else:
        a, _, b, word = _numbers(rng)
        large = rng.randint(world.ARITHMETIC_MAX + 1, rng.choice((60, 999)))
        a, b = [(large, b), (a, large), (large, large)][rng.randrange(3)]
    question = rng.choice(ARITHMETIC_QUESTIONS).format(a, word, b)
    reasoning = _reasoning("The user asks for arithmetic I cannot do.",
                           f"I only add and subtract numbers from 0 to {world.ARITHMETIC_MAX}.", "I should say so rather than guess.")
    return question, Reply(reasoning, final=world.ARITHMETIC_LIMITS)


NAMES = ("Ada", "Sam", "Lena", "Omar", "Mei", "Jonas", "Priya", "Tom")


def greeting(rng: random.Random) -> tuple[str, Reply]:
    question = rng.choice(("Hello", "Hello!", "Hi", "Hi!", "Hey", "Hi there", "Good morning", "Good evening",
                           "Hello, how are you?", "hello"))
    if rng.random() < 0.25:  # a chat's first message often says who writes
        question = rng.choice(("Hello! My name is {}.", "Hi, I am {}.", "Hi! I'm {}.")).format(rng.choice(NAMES))
    reasoning = _reasoning("The user greets me.", "I greet back and say what I can do.", "I keep it short.")
    return question, Reply(reasoning, final=world.GREETING)


def joke(rng: random.Random) -> tuple[str, Reply]:
    question = rng.choice(("Tell me a joke.", "Tell me a joke", "Do you know a joke?", "Make me laugh.", "Say something funny."))
    reasoning = _reasoning("The user wants a joke.", "I know a few.", "I pick one and tell it.")
    return question, Reply(reasoning, final=rng.choice(world.JOKES))


def identity(rng: random.Random) -> tuple[str, Reply]:
    question = rng.choice(("Who are you?", "What are you?", "What model are you?", "Are you gpt-oss?",
                           "What can you do?", "Are you a real model?"))
    reasoning = _reasoning("The user asks what I am.", "I am the tiny demo model of ossrun.",
                           "I should say how to get the real model.")
    return question, Reply(reasoning, final=world.IDENTITY)


def out_of_world(rng: random.Random) -> tuple[str, Reply]:
    if rng.random() < 0.3:
        question = rng.choice(world.UNKNOWN_QUESTIONS)
    elif rng.random() < 0.4:
        question = rng.choice(("What is the capital of {}?", "What's the capital of {}?")).format(rng.choice(world.UNKNOWN_PLACES))
    else:
        question = rng.choice(("Tell me about {}.", "What do you know about {}?", "Explain {}.", "Can you help me with {}?",
                               "What is {}?")).format(rng.choice(world.UNKNOWN_TOPICS))
    reasoning = _reasoning("The user asks about something outside my world.", "I do not know it.",
                           "I should say so rather than guess.")
    return question, Reply(reasoning, final=world.OUT_OF_WORLD)


def weather_question(rng: random.Random, city: str) -> str:
    return rng.choice(("What is the weather in {}?", "What's the weather like in {}?", "How is the weather in {} today?",
                       "Is it raining in {}?", "Weather in {}?", "Do I need an umbrella in {}?")).format(city)


def weather_without_tool(rng: random.Random) -> tuple[str, Reply]:
    question = weather_question(rng, rng.choice(world.CITIES))
    reasoning = _reasoning("The user asks about the weather.", "I have no weather tool here.", "I should say what I need.")
    return question, Reply(reasoning, final=world.NO_WEATHER_TOOL)


def weather_call_reply(city: str, argument: str) -> Reply:
    reasoning = _reasoning(f"The user wants the weather in {city}.", "I will call get_weather.",
                           f"The city is {city}, so that is the argument.")
    return Reply(reasoning, call=("get_weather", {argument: city}))


def weather_answer(city: str, temperature: int, condition: str) -> Reply:
    reasoning = _reasoning(f"The tool says {temperature}°C and {condition} in {city}.", "I report it.",
                           "One sentence with the temperature and the sky.")
    return Reply(reasoning, final=f"It is {temperature}°C and {condition} in {city}.")


def tool_result(rng: random.Random, city: str, temperature: int, condition: str) -> str:
    """A tool's JSON in one of a few shapes, spaced as Python writes it or compact as JavaScript's JSON.stringify."""
    value = rng.choice(({"temperature_c": temperature, "condition": condition},
                        {"city": city, "temperature_c": temperature, "condition": condition},  # the playground's
                        {"city": city, "temperature": temperature, "unit": "celsius", "conditions": condition}))
    return json.dumps(value, separators=(",", ":") if rng.random() < 0.4 else None)


# -- rendering ------------------------------------------------------------------------------------

def completion_ids(reply: Reply, effort: str, with_reasoning: bool = True) -> list[int]:
    """The tokens gpt-oss writes after `<|start|>assistant` (the final one `<|return|>` or `<|call|>`)."""
    ids: list[int] = []
    if with_reasoning:
        ids += harmony.encode("<|channel|>analysis<|message|>", allow_special=True)
        ids += harmony.encode(reply.reasoning[effort]) + [harmony.END, harmony.START] + harmony.encode("assistant")
    if reply.call is not None:
        name, arguments = reply.call
        return ids + harmony.tool_call_prefix(name) + harmony.encode(json.dumps(arguments, ensure_ascii=False)) + [harmony.CALL]
    return ids + harmony.encode("<|channel|>final<|message|>", allow_special=True) + harmony.encode(reply.final) + [harmony.RETURN]


def _body(rng: random.Random, messages: list[dict[str, Any]], effort: str, tools: list[dict[str, Any]]) -> dict[str, Any]:
    if rng.random() < 0.15:
        messages = [{"role": "system", "content": rng.choice(INSTRUCTIONS)}, *messages]
    body: dict[str, Any] = {"messages": messages}
    if effort != "medium" or rng.random() < 0.5:  # medium is the default: rendered the same either way
        body["reasoning_effort"] = effort
    if tools:
        body["tools"] = tools
    return body


def _history(rng: random.Random, share: float = 0.25) -> list[dict[str, Any]]:
    """Sometimes an earlier exchange, as a client sends it back (answers only, no reasoning): a chat's second turn
    must be read as its own question, whatever the first was."""
    if rng.random() > share:
        return []
    question, reply = rng.choice((greeting, capital, arithmetic, joke, identity, out_of_world))(rng)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply.final}]


# The JSON answers' schemas, as a client states them in `response_format` (the server renders them into the
# developer message's `# Response Formats` section): asked in any words, the answer is that JSON.
CAPITAL_SCHEMA = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
                  "required": ["country", "capital"]}
SUM_SCHEMA = {"type": "object", "properties": {"expression": {"type": "string"}, "result": {"type": "integer"}},
              "required": ["expression", "result"]}
FORMAT_NAMES = (None, "answer", "result", "response", "capital", "output")
FORMAT_DESCRIPTIONS = (None, None, "The answer as JSON.", "Structured answer")


def capital_format(rng: random.Random) -> tuple[str, Reply]:
    return capital_json(rng, rng.choice((CAPITAL_QUESTIONS, CAPITAL_JSON_QUESTIONS)))


def arithmetic_format(rng: random.Random) -> tuple[str, Reply]:
    return arithmetic_json(rng, rng.choice((ARITHMETIC_QUESTIONS, ARITHMETIC_JSON_QUESTIONS)))


def stated_format(rng: random.Random, kind: str) -> harmony.ResponseFormatSection | None:
    """The `response_format` a client sent with a `*_format` question (its schema, strict or not, named or not)."""
    schema = {"capital_format": CAPITAL_SCHEMA, "arithmetic_format": SUM_SCHEMA}.get(kind)
    if schema is None:
        return None
    if rng.random() < 0.5:
        schema = {**schema, "additionalProperties": False}
    return harmony.ResponseFormatSection(schema, rng.choice(FORMAT_NAMES), rng.choice(FORMAT_DESCRIPTIONS))


SIMPLE: dict[str, Callable[[random.Random], tuple[str, Reply]]] = {
    "capital": capital, "capital_json": capital_json, "arithmetic": arithmetic, "arithmetic_json": arithmetic_json,
    "capital_format": capital_format, "arithmetic_format": arithmetic_format,
    "arithmetic_limits": arithmetic_limits, "greeting": greeting, "joke": joke, "identity": identity,
    "out_of_world": out_of_world, "weather_without_tool": weather_without_tool,
}
# Kinds whose prompt words the model must not learn (they read as UNK: "something I do not know").
UNKNOWN_KINDS = ("out_of_world", "arithmetic_limits")


def simple_sample(rng: random.Random, kind: str) -> Sample:
    """A question answered from the model's own knowledge; tools are sometimes offered and not used."""
    question, reply = SIMPLE[kind](rng)
    effort = rng.choice(EFFORTS)
    offered = rng.random() < 0.2 and kind != "weather_without_tool"
    tools = _tools(rng, rng.choice(WEATHER_TOOLS)[0] if offered else None)
    if kind == "weather_without_tool":
        tools = [t for t in tools if t["function"]["name"] != "get_weather"]
    body = _body(rng, [*_history(rng), {"role": "user", "content": question}], effort, tools)
    prompt = harmony.render_request(body, response_format=stated_format(rng, kind)).token_ids
    return Sample(kind, prompt, completion_ids(reply, effort), kind in UNKNOWN_KINDS)


def weather_call_sample(rng: random.Random, forced: bool) -> Sample:
    """A weather question with get_weather offered: the model calls it (`forced`: prefilled header, arguments only)."""
    city = rng.choice(world.CITIES)
    tool, argument = rng.choice(WEATHER_TOOLS)
    effort = rng.choice(EFFORTS)
    body = _body(rng, [*_history(rng), {"role": "user", "content": weather_question(rng, city)}], effort, _tools(rng, tool))
    prompt = harmony.render_request(body).token_ids
    completion = completion_ids(weather_call_reply(city, argument), effort, with_reasoning=not forced)
    if forced:
        prefix = harmony.tool_call_prefix("get_weather")
        prompt, completion = prompt + prefix, completion[len(prefix):]
    return Sample("weather_forced" if forced else "weather_call", prompt, completion)


def weather_answer_sample(rng: random.Random) -> Sample:
    """The turn after the call: the tool's result is in the prompt, the model answers from it."""
    city = rng.choice(world.CITIES)
    tool, argument = rng.choice(WEATHER_TOOLS)
    temperature, condition = rng.randint(0, 35), rng.choice(world.CONDITIONS)
    effort = rng.choice(EFFORTS)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({argument: city}, ensure_ascii=False)}}
    turn: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
    if rng.random() < 0.4:  # the call's own reasoning sent back, as a Responses continuation renders it
        turn["reasoning_content"] = weather_call_reply(city, argument).reasoning[effort]
    # An earlier exchange (a chat page's first question) names other places: the answer's city is this call's.
    messages = [*_history(rng, 0.3), {"role": "user", "content": weather_question(rng, city)}, turn,
                {"role": "tool", "tool_call_id": "call_1", "content": tool_result(rng, city, temperature, condition)}]
    body = _body(rng, messages, effort, _tools(rng, tool))
    return Sample("weather_answer", harmony.render_request(body).token_ids,
                  completion_ids(weather_answer(city, temperature, condition), effort))


def after_unanswered_call_sample(rng: random.Random) -> Sample:
    """A weather question whose call was never answered, then another question: the client dropped the call (the
    server refuses a call left without its result, and a call cut by `max_tokens` is left out), so two user turns
    follow each other. The model answers the last one, not the weather again."""
    kind = rng.choice(("capital", "arithmetic", "greeting", "joke", "identity"))
    question, reply = SIMPLE[kind](rng)
    effort = rng.choice(EFFORTS)
    earlier = {"role": "user", "content": weather_question(rng, rng.choice(world.CITIES))}
    body = _body(rng, [earlier, {"role": "user", "content": question}], effort, _tools(rng, rng.choice(WEATHER_TOOLS)[0]))
    return Sample("after_unanswered_call", harmony.render_request(body).token_ids, completion_ids(reply, effort))


def json_mode_sample(rng: random.Random) -> Sample:
    """`response_format: json_object`: the prompt says nothing of JSON, the model reasons as for any question, and the
    grammar makes the answer's first token open an object. What follows it is learnt (the answer's JSON), not that
    first token: the same question without the format must still be answered in words."""
    if rng.random() < 0.5:
        a, op, b, word = _numbers(rng)
        question = _asked(rng, rng.choice(ARITHMETIC_QUESTIONS), a, word, b)
        result = world.OPERATIONS[op](a, b)
        reasoning = _reasoning(f"The user asks for {a} {op} {b}: {arithmetic_steps(a, op, b)}.",
                               f"So {a} {op} {b} = {result}.", "I counted one step at a time, so it is right.")
        answer = {"expression": f"{a} {op} {b}", "result": result}
    else:
        country, city = rng.choice(list(world.COUNTRIES.items()))
        question = rng.choice(CAPITAL_QUESTIONS).format(country)
        reasoning = _reasoning(_sentence(f"The user asks for the capital of {country}: it is {city}"),
                               f"{country} is in my list of countries, so I am sure.", "One sentence is enough.")
        answer = {"country": country, "capital": city}
    effort = rng.choice(EFFORTS)
    body = _body(rng, [*_history(rng), {"role": "user", "content": question}], effort, [])
    final = json.dumps(answer, ensure_ascii=False)
    completion = completion_ids(Reply(reasoning, final=final), effort)
    opened = len(completion) - len(harmony.encode(final))  # the answer's second token: after `<|return|>` is taken off
    return Sample("json_mode", harmony.render_request(body).token_ids + completion[:opened], completion[opened:])


# Share of each kind in the training set.
MIX: dict[str, float] = {
    "capital": 0.14, "capital_json": 0.06, "capital_format": 0.04, "arithmetic": 0.16, "arithmetic_json": 0.02,
    "arithmetic_format": 0.03, "arithmetic_limits": 0.02,
    "greeting": 0.04, "joke": 0.03, "identity": 0.03, "out_of_world": 0.08, "weather_without_tool": 0.02,
    "weather_call": 0.13, "weather_forced": 0.07, "weather_answer": 0.12,
    "after_unanswered_call": 0.03, "json_mode": 0.03,
}


def generate(n: int, seed: int) -> list[Sample]:
    """`n` conversations drawn from MIX, the same for the same seed."""
    rng = random.Random(seed)
    kinds, weights = zip(*MIX.items())
    samples = []
    for kind in rng.choices(kinds, weights, k=n):
        if kind == "weather_call":
            samples.append(weather_call_sample(rng, forced=False))
        elif kind == "weather_forced":
            samples.append(weather_call_sample(rng, forced=True))
        elif kind == "weather_answer":
            samples.append(weather_answer_sample(rng))
        elif kind == "after_unanswered_call":
            samples.append(after_unanswered_call_sample(rng))
        elif kind == "json_mode":
            samples.append(json_mode_sample(rng))
        else:
            samples.append(simple_sample(rng, kind))
    return samples
