"""Structured output on the tiny random model: its tokens are noise, so only the grammar can make these pass.

Every completion is read back with `ossrun.harmony`'s parser, whole (`parse_completion`) and token by
token (`StreamParser`, what the streaming routes use), and validated with `jsonschema`.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from ossrun.engine import budget_search, constraints
from ossrun.engine.constraints import ConstraintCompiler, ConstraintViolation, GrammarError
from ossrun.engine.pattern_sample import pattern_sample
from ossrun.engine.sampler import _apply_masks
from ossrun.harmony import grammar as harmony_grammar
from ossrun.harmony.grammar import default_reasoning_budget, llguidance_tokenizer
from ossrun.engine.engine import Engine, EngineOptions
from ossrun.engine.request import Request, SamplingParams
from ossrun.harmony import (
    CALL,
    CHANNEL,
    END,
    MESSAGE,
    RETURN,
    START,
    STOP_TOKENS,
    VOCAB_SIZE,
    ContentDelta,
    StreamParser,
    ToolCallArgumentsDelta,
    ToolCallStart,
    decode,
    encode,
    fold_events,
    parse_completion,
    render_request,
)
from ossrun.model.checkpoint import load_checkpoint
from ossrun.model.gpt_oss import GptOss


def string(n: int = 12) -> dict:
    return {"type": "string", "maxLength": n}


def integer(lo: int = 0, hi: int = 100) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


# Bounded strings and numbers: a random model never closes an unbounded string on its own (a real
# model does), and these tests must end within max_tokens.
SCHEMAS = [
    obj({"name": string(), "color": {"enum": ["red", "green", "blue"]}, "count": integer()}),
    obj({"user": obj({"id": integer(1, 9999), "email": string(20), "role": {"enum": ["admin", "viewer"]}}),
         "active": {"type": "boolean"}}),
    obj({"items": {"type": "array", "minItems": 1, "maxItems": 3,
                   "items": obj({"sku": string(8), "qty": integer(1, 9), "unit": {"enum": ["kg", "pcs"]}})}}),
    obj({"title": string(16),
         "meta": obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
                      "score": integer(-5, 5), "note": string(10)}, required=["tags"]),
         "flag": {"type": "boolean"}}, required=["title", "meta"]),
    obj({"grid": {"type": "array", "minItems": 1, "maxItems": 2,
                  "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": integer(0, 9)}},
         "shape": {"anyOf": [obj({"kind": {"const": "circle"}, "r": integer(1, 50)}),
                             obj({"kind": {"const": "square"}, "side": integer(1, 50)})]},
         "level": {"enum": [1, 2, 3, None]}}),
]
WEATHER = obj({"city": string(16), "unit": {"enum": ["c", "f"]}, "days": integer(1, 7)}, required=["city", "unit"])
SEARCH = obj({"query": string(20), "limit": integer(1, 10)})
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search", "description": "Web search", "parameters": SEARCH}},
]


class Grammars:
    """What a request gets: a harmony grammar (`ossrun.harmony.grammar`, data) compiled by the engine's compiler."""

    def __init__(self) -> None:
        self.engine = ConstraintCompiler(llguidance_tokenizer())

    @property
    def compiled(self) -> int:
        return self.engine.compiled

    def json_final(self, *args, **kwargs):
        return self.engine.compile(harmony_grammar.json_final(*args, **kwargs))

    def tool_call(self, *args, **kwargs):
        return self.engine.compile(harmony_grammar.tool_call(*args, **kwargs))

    def tools(self, *args, **kwargs):
        grammar = harmony_grammar.tools(*args, **kwargs)
        return None if grammar is None else self.engine.compile(grammar)


@pytest.fixture(scope="module")
def compiler():
    grammars = Grammars()
    yield grammars
    grammars.engine.close()


@pytest.fixture(scope="module")
def model(checkpoints):
    return GptOss.from_checkpoint(load_checkpoint(checkpoints["hf"]), torch.float32)


def make_engine(model) -> Engine:
    engine = Engine(model, EngineOptions(kv_dtype=torch.float32, max_tokens_per_step=512, kv_cache_bytes=64 * 1024**2,
                                         max_model_len=4096, max_num_seqs=32))
    if not hasattr(Engine, "_advance_constraint"):  # until the engine feeds its constraints itself
        postprocess = engine._postprocess

        def feeding_postprocess(seq, output, i):
            if seq.error is None and seq.request.constraint is not None:
                seq.request.constraint.advance(output.token_ids[i])
            return postprocess(seq, output, i)

        engine._postprocess = feeding_postprocess
    return engine


def generated(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def streamed(tokens: list[int]):
    """What a streaming route sees: events token by token, folded."""
    parser = StreamParser()
    events = [e for t in tokens for e in parser.feed(t)] + parser.finish()
    return events, fold_events(events, parser.anomalies)


def sampled(seed: int, max_tokens: int = 600) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, stop_token_ids=STOP_TOKENS)


def take(constraint, pick) -> int:
    """One token as the engine takes it: `pick(mask)` samples from the mask; near the end of max_tokens the
    constraint checks that token and may refuse it (`choose`: `pick` is asked again without it)."""
    token = pick(constraint.allowed_tokens())
    if constraint.guarding:
        token = constraint.choose(token, pick)
    constraint.advance(token)
    return token


def lowest(mask) -> int:
    return int(mask.nonzero()[0])


def feed(constraint, text: str) -> list[int]:
    """Drive a constraint through `text` (harmony tokens spelled out) as the engine would."""
    tokens = encode(text, allow_special=True)
    for token in tokens:
        assert constraint.allowed_tokens()[token], f"token {token} refused in {text!r}"
        constraint.advance(token)
    return tokens


# -- on the engine ------------------------------------------------------------------------------

def test_twenty_json_schema_requests_parse_and_validate(model, compiler):
    """The random model never ends its reasoning itself: each one that reasons has it ended by the budget, which is
    reported "length" (hunt round 14 A-F1: it was "stop", as for an answer max_tokens had not shaped)."""
    prompt = render_request({"messages": [{"role": "user", "content": "Describe it as JSON."}]}).token_ids
    requests = [Request(str(i), prompt, sampled(seed=i + 1),
                        constraint=compiler.json_final(SCHEMAS[i % len(SCHEMAS)], reasoning_budget=16)) for i in range(20)]
    results = make_engine(model).generate(requests)
    reasoned = 0
    for i in range(20):
        tokens, schema = generated(results[str(i)]), SCHEMAS[i % len(SCHEMAS)]
        assert tokens[-1] == STOP_TOKENS[0], f"request {i}"
        whole = parse_completion(tokens)
        assert results[str(i)][-1].finish_reason == ("length" if whole.reasoning else "stop"), f"request {i}"
        events, stream = streamed(tokens)
        assert whole.finish_reason == stream.finish_reason == "stop" and not whole.anomalies
        assert whole.content == stream.content and not whole.tool_calls
        jsonschema.validate(json.loads(whole.content), schema)
        reasoned += bool(whole.reasoning)
    assert reasoned > 0  # the analysis channel stays open to the model


def test_named_tool_choice_forces_that_call_with_valid_arguments(model, compiler):
    prompt = render_request({"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": TOOLS}).token_ids
    requests = [Request(str(i), prompt, sampled(seed=100 + i),
                        constraint=compiler.tool_call("get_weather", WEATHER, reasoning_budget=8)) for i in range(4)]
    results = make_engine(model).generate(requests)
    for i in range(4):
        tokens = generated(results[str(i)])
        assert results[str(i)][-1].stop_reason == STOP_TOKENS[1]  # <|call|>
        whole = parse_completion(tokens)
        events, stream = streamed(tokens)
        assert whole.finish_reason == stream.finish_reason == "tool_calls"
        assert whole.content == stream.content == "" and not any(isinstance(e, ContentDelta) for e in events)
        assert [c.name for c in whole.tool_calls] == ["get_weather"] and not whole.anomalies
        jsonschema.validate(json.loads(whole.tool_calls[0].arguments), WEATHER)
        starts = [e for e in events if isinstance(e, ToolCallStart)]
        deltas = "".join(e.text for e in events if isinstance(e, ToolCallArgumentsDelta))
        assert [s.name for s in starts] == ["get_weather"] and deltas == whole.tool_calls[0].arguments


def test_required_calls_one_of_the_tools(model, compiler):
    prompt = render_request({"messages": [{"role": "user", "content": "Help."}], "tools": TOOLS}).token_ids
    constraint = lambda: compiler.tools({"get_weather": WEATHER, "search": SEARCH}, "required", reasoning_budget=8)  # noqa: E731
    results = make_engine(model).generate([Request(str(i), prompt, sampled(seed=200 + i), constraint=constraint()) for i in range(6)])
    for i in range(6):
        whole = parse_completion(generated(results[str(i)]))
        assert whole.finish_reason == "tool_calls" and whole.content == "" and len(whole.tool_calls) == 1
        call = whole.tool_calls[0]
        jsonschema.validate(json.loads(call.arguments), {"get_weather": WEATHER, "search": SEARCH}[call.name])


def test_auto_and_none_on_the_engine(model, compiler):
    prompt = render_request({"messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS}).token_ids
    tools = {"get_weather": WEATHER, "search": SEARCH}
    requests = [Request(f"auto{i}", prompt, sampled(seed=300 + i, max_tokens=300),
                        constraint=compiler.tools(tools, "auto", reasoning_budget=8)) for i in range(6)]
    requests += [Request(f"none{i}", prompt, sampled(seed=400 + i, max_tokens=300),
                         constraint=compiler.tools(tools, "none", final_schema=SCHEMAS[0], reasoning_budget=8)) for i in range(3)]
    results = make_engine(model).generate(requests)
    for name, events in results.items():
        whole = parse_completion(generated(events), reason_if_not_stopped=events[-1].finish_reason)
        assert not whole.anomalies
        if whole.tool_calls:  # "auto" may call; the arguments then follow the tool's schema
            assert name.startswith("auto") and whole.finish_reason == "tool_calls" and len(whole.tool_calls) == 1
            jsonschema.validate(json.loads(whole.tool_calls[0].arguments), tools[whole.tool_calls[0].name])
        elif name.startswith("none"):
            jsonschema.validate(json.loads(whole.content), SCHEMAS[0])


def test_unconstrained_requests_pay_nothing(model, compiler, monkeypatch):
    prompt = render_request({"messages": [{"role": "user", "content": "Hello"}]}).token_ids
    free = lambda rid: Request(rid, prompt, SamplingParams(max_tokens=12, temperature=0))  # noqa: E731
    engine = make_engine(model)
    masks_seen = []
    sampler = engine.runner.sampler
    engine.runner.sampler = lambda logits, states, masks=None: masks_seen.append(masks) or sampler(logits, states, masks)
    alone = generated(engine.generate([free("alone")])["alone"])
    assert masks_seen and all(m is None for m in masks_seen)  # no mask built, none applied
    beside = engine.generate([free("beside"), Request("json", prompt, sampled(seed=5), constraint=compiler.json_final(SCHEMAS[0], reasoning_budget=4))])
    assert generated(beside["beside"]) == alone  # a constrained neighbour changes nothing


def nested(depth: int, leaf: dict | None = None) -> dict:
    """Objects `depth` deep, one required property each (`{"k7": {"k6": … {"k0": leaf}}}`), as hunt_fuzz sent."""
    schema = leaf or string(5)
    for level in range(depth):
        schema = {"type": "object", "properties": {f"k{level}": schema}, "required": [f"k{level}"]}
    return schema


ADDRESS = obj({"street": string(), "city": string(), "geo": obj({"lat": {"type": "number"}, "lon": {"type": "number"}})})
ORDER = obj({"id": string(), "customer": obj({"name": string(), "address": ADDRESS}),
             "items": {"type": "array", "minItems": 1, "items": obj({"sku": string(), "qty": integer()})}})


def counted_searches(monkeypatch, most: int) -> list[bool]:
    """Whether each budget search found a path; past `most` failures a search fails at once (as it would, slowly)."""
    found, search = [], constraints.shortest_completion

    def counting(*args, **kwargs):
        if found.count(False) >= most:
            found.append(False)
            raise constraints.SearchTimeout("counted out")
        try:
            path = search(*args, **kwargs)
        except constraints.SearchTimeout:
            found.append(False)
            raise
        found.append(bool(path))
        return path

    monkeypatch.setattr(constraints, "shortest_completion", counting)
    return found


def test_objects_nested_8_deep_end_as_valid_json_within_max_tokens(model, compiler, monkeypatch):
    """hunt_fuzz #1: the search did not find the way out of objects nested 6+ deep (each `}` leaves the mask as it
    was, so it looked like no progress), the request ran without the guarantee and searched again, up to 2 s, on
    every one of its last 128 tokens: 30-195 s, invalid JSON. Now the search follows the nesting, finds it, and
    a request searches again only when the model left the path (found at once) or, after a failure, rarely."""
    schema, max_tokens = nested(8), 100
    found = counted_searches(monkeypatch, most=3)
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", 60.0)  # the search ends by itself; a busy machine must not matter
    prompt = render_request({"messages": [{"role": "user", "content": "hi"}]}).token_ids
    constraint = compiler.json_final(schema, reasoning_budget=0, max_tokens=max_tokens)
    results = make_engine(model).generate([Request("deep", prompt, sampled(seed=3, max_tokens=max_tokens),
                                                   constraint=constraint)])
    tokens = generated(results["deep"])
    assert len(tokens) <= max_tokens and tokens[-1] == STOP_TOKENS[0]  # complete (the guard may have cut it: "length")
    jsonschema.validate(json.loads(parse_completion(tokens).content), schema)
    assert found and found[0] and found.count(False) <= constraints._FAILED_SEARCHES


@pytest.mark.parametrize("schema, max_tokens", [(nested(16), 150), (nested(32), 150), (nested(6, ORDER), 200)])
def test_the_budget_search_finds_the_way_out_of_deeper_nesting(compiler, monkeypatch, schema, max_tokens):
    """Deeper still, and a realistic order → customer → address → geo nested in more objects: the compiler's search
    finds a complete answer within max_tokens (objects 32 deep take 118 tokens; the search spells 228, twice as many)."""
    found = counted_searches(monkeypatch, most=1)
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", 60.0)
    compiler.json_final(schema, reasoning_budget=0, max_tokens=max_tokens)
    assert found == [True]


def test_a_search_that_finds_nothing_is_not_run_again_every_token(compiler, monkeypatch, caplog):
    """A search that finds nothing (here: out of time) would find nothing again next token: it ran on every one of
    the last 128 (2 s each, holding the batch up). Now the next waits CLOSING_WINDOW tokens, then twice that, and
    a request searches at most _FAILED_SEARCHES times in all; the log says nothing was proven."""
    found = counted_searches(monkeypatch, most=50)
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", -1.0)
    constraint = compiler.json_final(obj({"k": integer(4, 6), "note": string(11)}), reasoning_budget=0, max_tokens=120)
    with caplog.at_level("WARNING", logger="ossrun.engine.constraints"):
        for _ in range(119):
            take(constraint, lambda mask: encode(" ")[0] if mask[encode(" ")[0]] else lowest(mask))
    assert found == [False] * 3  # the compiler's, then after 32 and 64 more tokens (_FAILED_SEARCHES); was every token
    assert "no complete answer found within the search limits" in caplog.text and "fits" not in caplog.text


def test_a_request_searching_its_answer_does_not_hold_up_the_others(model, compiler, monkeypatch):
    """hunt_fuzz #1: the budget search ran inside the mask that every engine step waits for, so every request of the
    batch waited for one request's search (a 20-token chat took 23-42 s). Now that row sits steps out while the
    others run: here its search is held until the plain request beside it has finished."""
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", -1.0)  # the compiler's search runs out of time: searched later
    structured = compiler.json_final(obj({"k": integer(4, 6), "note": string(13)}), reasoning_budget=0, max_tokens=100)
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", 2.0)
    release, holding, search = threading.Event(), [], constraints.shortest_completion

    def held(*args, **kwargs):
        if not holding:
            holding.append(True)
            release.wait(timeout=60)
            holding.append(False)
        return search(*args, **kwargs)

    monkeypatch.setattr(constraints, "shortest_completion", held)
    prompt = render_request({"messages": [{"role": "user", "content": "hi"}]}).token_ids
    engine = make_engine(model)
    engine.add(Request("json", prompt, sampled(seed=7, max_tokens=100), constraint=structured))
    engine.add(Request("plain", prompt, SamplingParams(max_tokens=80, temperature=1.0, seed=8)))
    results, ended_while_held = {"json": [], "plain": []}, False
    while engine.has_work:
        for event in engine.step():
            results[event.request_id].append(event)
            if event.request_id == "plain" and event.finish_reason is not None:
                ended_while_held = holding == [True]
                release.set()
    assert ended_while_held and holding == [True, False]
    tokens = generated(results["json"])
    assert len(tokens) <= 100 and len(generated(results["plain"])) == 80
    json.loads(parse_completion(tokens).content)


# -- the grammar itself ---------------------------------------------------------------------------

def test_what_gpt_oss_writes_is_accepted_and_parsed(compiler):
    reply = feed(compiler.tool_call("get_weather", WEATHER),
                 '<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant'
                 '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo","unit":"c"}<|call|>')
    whole = parse_completion(reply)
    assert (whole.reasoning, whole.finish_reason, whole.anomalies) == ("Need the weather tool.", "tool_calls", [])
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [("get_weather", '{"city":"Oslo","unit":"c"}')]
    constraint = compiler.json_final(None)  # json_object: any JSON object
    feed(constraint, '<|channel|>final<|message|>{"any": [1, {"thing": null}]}<|return|>')
    assert constraint.is_finished


def test_reasoning_is_free_text_without_special_tokens(compiler):
    constraint = compiler.json_final(SCHEMAS[0])
    feed(constraint, "<|channel|>analysis<|message|>Let me think")
    mask = constraint.allowed_tokens()
    specials = mask[199998:].nonzero().flatten() + 199998
    assert specials.tolist() == [END] and int(mask.sum()) > 190000
    with pytest.raises(ConstraintViolation, match="token 200006 .*not allowed here"):
        constraint.advance(START)
    with pytest.raises(ConstraintViolation, match="not allowed here"):  # a failed grammar stays failed
        constraint.allowed_tokens()


def test_reasoning_budget_closes_the_analysis_message(compiler):
    """At the budget the mask stays the grammar's (it allowed only `<|end|>` before: hunt round 14 A-F1), so the model's
    own choice is seen: `choose` keeps its `<|end|>` (it ended the reasoning itself, not cut), and replaces any other
    token with `<|end|>` (the budget ended it: cut, reported "length"). Past the limit nothing but `<|end|>` is taken."""
    more = encode(" four")[0]
    for wanted, cut in ((END, False), (more, True)):
        constraint = compiler.json_final(SCHEMAS[0], reasoning_budget=3)
        feed(constraint, "<|channel|>analysis<|message|> one two three")
        assert constraint.span_tokens == 3 and constraint.guarding and constraint.allowed_tokens()[more]
        offered = []
        assert constraint.choose(wanted, lambda mask: offered.append(mask) or lowest(mask)) == END
        assert (constraint.cut, [m.nonzero().flatten().tolist() for m in offered]) == (cut, [[END]] if cut else [])
        feed(constraint, '<|end|><|start|>assistant<|channel|>final<|message|>{"name":"x","color":"red","count":1}<|return|>')
        assert constraint.is_finished and constraint.cut == cut
    skipped = compiler.json_final(SCHEMAS[0], reasoning_budget=3)
    feed(skipped, "<|channel|>analysis<|message|> one two three")
    with pytest.raises(ConstraintViolation, match="past the span's limit"):  # a caller that did not ask `choose`
        skipped.advance(more)
    no_reasoning = compiler.json_final(SCHEMAS[0], reasoning_budget=0)
    assert no_reasoning.allowed_tokens().nonzero().flatten().tolist() == [CHANNEL]
    no_reasoning.advance(CHANNEL)
    assert not no_reasoning.allowed_tokens()[encode("analysis")[0]]
    assert default_reasoning_budget(256) == 128 and default_reasoning_budget(4096) == 3072 and default_reasoning_budget(1) == 1


def test_none_forbids_calls_and_auto_constrains_arguments(compiler):
    with pytest.raises(AssertionError, match="refused"):
        feed(compiler.tools({"search": SEARCH}, "none"), "<|channel|>commentary to=functions.search")
    auto = compiler.tools({"search": SEARCH}, "auto")
    feed(auto, '<|channel|>commentary to=functions.search <|constrain|>json<|message|>{"query":')
    assert not auto.allowed_tokens()[encode("42")[0]]  # the schema wants a string here
    free = compiler.tools({"search": SEARCH}, "auto")
    feed(free, "<|channel|>final<|message|>Plain text, no call.<|return|>")


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_a_plain_answer_cannot_address_a_recipient(compiler, mode):
    """No tool to call (no tools, tool_choice "none"): wherever the parser reads header text, no token with an `=` is
    allowed, so `to=NAME` cannot be written; everything else is as free as without a grammar (the demo model, seed 23,
    wrote `<|end|>` after its answer, then `<|start|>assistant<|channel|>commentary to=functions Riyadh.`, read back
    as a call)."""
    def no_equals_sign(constraint) -> bool:
        allowed = constraint.allowed_tokens().nonzero().flatten().tolist()
        return len(allowed) > 3_000 and MESSAGE in allowed and not [t for t in allowed if "=" in decode([t])]

    headers = ["", "<|channel|>commentary to", "<|channel|>final<|message|>Helloot.<|end|>",
               "<|channel|>final<|message|>Helloot.<|end|><|start|>assistant<|channel|>commentary ",
               "<|channel|>analysis<|message|>x = 1<|channel|>", "assistant to"]  # a header the model spelled itself
    for header in headers:
        plain = compiler.tools({}, mode)
        feed(plain, header)
        assert no_equals_sign(plain), header
    free = compiler.tools({}, mode)  # no budget, no structure: reasoning, text with `=`, any order of messages
    feed(free, "<|channel|>analysis<|message|>" + "and on " * 300 + "<|end|><|channel|>final<|message|>1 + 1 = 2<|end|>"
               "<|start|>assistant<|channel|>analysis<|message|>more<|channel|>final<|message|>done<|return|>")
    assert free.is_finished
    free = compiler.tools({}, mode)  # an answer without any header (a fine-tune's), as long as it likes
    feed(free, "Text with no header, " + "and on " * 300 + "<|return|>")
    assert free.is_finished and compiler.tools({"search": SEARCH}, "none").mask().dtype == torch.bool
    for recipient in ("<|channel|>commentary to=functions.get", "<|channel|>analysis to=python", " to=browser.search<|channel|>",
                      "<|channel|>final<|message|>Helloot.<|end|><|start|>assistant<|channel|>commentary to=functions"):
        with pytest.raises(AssertionError, match="refused"):
            feed(compiler.tools({}, mode), recipient)


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_a_plain_answer_cannot_end_a_header_without_its_message(compiler, mode):
    """Hunt round 22 A-F2: with tools and `tool_choice: "none"` the demo model wrote `<|channel|>commentary to`, was
    refused the `=`, wrote the arguments and ended with `<|call|>`; the parser read the header text no `<|message|>`
    followed as the message's, and `to{"city": "Tokyo"}` came back as the answer. No message may end with `<|call|>`,
    and header text is followed by its `<|message|>` (within fewer tokens than the parser reads as a header)."""
    def allowed(constraint) -> set[int]:
        return set(constraint.allowed_tokens().nonzero().flatten().tolist())

    header = compiler.tools({}, mode)
    feed(header, '<|channel|>commentary to{')
    assert MESSAGE in allowed(header) and not {CALL, RETURN, END, START} & allowed(header)
    with pytest.raises(AssertionError, match="refused"):  # ever more header text: the parser would read it as the answer
        feed(compiler.tools({}, mode), "<|channel|>commentary" + " and on" * 10)
    for text in ("<|channel|>final<|message|>Hi", "<|channel|>commentary<|message|>Hi", "<|channel|>final<|message|>Hi<|end|>"):
        message = compiler.tools({}, mode)
        feed(message, text)
        assert RETURN in allowed(message) and CALL not in allowed(message), text
    for text in ("<|channel|>final<|message|>Hi<|end|><|start|>assistant<|channel|>final", "<|channel|>final<|message|>Hi<|end|>x"):
        cut = compiler.tools({}, mode)
        feed(cut, text)
        assert not {RETURN, END, START} & allowed(cut), text


def test_a_free_text_mask_goes_to_the_sampler_as_its_few_forbidden_ids(compiler):
    """Free text forbids ~1,400 of 201,088 tokens (special tokens, some bytes): the sampler gets their ids and fills
    them, where a bool mask cost it passes over the vocabulary (0.6 ms a token on one thread, every plain answer has
    this grammar). The same tokens are forbidden either way; the budget guard still reads whole masks (a spent span
    no longer needs one: the model's token goes to `choose`, which takes `<|end|>`)."""
    plain = compiler.tools({}, "auto")
    feed(plain, "<|channel|>final<|message|>Hello")
    forbidden, allowed = plain.mask(), plain.allowed_tokens()
    assert forbidden.dtype == torch.int64 and torch.equal(forbidden.sort().values, (~allowed).nonzero().flatten())
    logits = torch.randn(1, VOCAB_SIZE).repeat(2, 1)
    _apply_masks(logits, [forbidden, allowed])
    assert torch.equal(logits[0], logits[1]) and logits[0, VOCAB_SIZE - 1] == float("-inf")  # a reserved special token
    assert compiler.json_final(SCHEMAS[0], max_tokens=100).mask().dtype == torch.bool
    spent = compiler.tools({"search": SEARCH}, "auto", reasoning_budget=2)
    feed(spent, "<|channel|>analysis<|message|> one two")
    assert spent.mask().dtype == torch.int64 and spent.guarding and spent.choose(encode(" three")[0], lowest) == END


@pytest.mark.parametrize(("build", "reason"), [
    (lambda c: c.json_final({"type": "objekt"}), "Invalid type: objekt"),
    (lambda c: c.json_final({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "/nowhere"),
    (lambda c: c.json_final({"oneOf": [{"type": "integer"}, {"type": "number"}]}), "oneOf"),
    (lambda c: c.json_final(["not", "a", "schema"]), "must be a JSON object"),
    (lambda c: c.tool_call("get_weather", {"type": "string", "format": "no-such-format"}), "parameters of tool 'get_weather'"),
    (lambda c: c.tool_call("bad name", None), "tool name"),
    (lambda c: c.tools({}, "required"), "at least one tool"),
])
def test_a_schema_that_cannot_compile_is_a_grammar_error_with_the_reason(compiler, build, reason):
    with pytest.raises(GrammarError, match=reason):
        build(compiler)


def test_a_schema_with_integers_beyond_64_bits_compiles(compiler):
    """JSON has no integer limit and Python parses big ones exactly; llguidance refused such a schema when handed
    as a dict ("Value is not JSON serializable", a 400 on a schema-valid body; found by the bounded fuzz)."""
    big = 8914607640616458256384
    schema = obj({"n": {"type": "integer", "maximum": big}})
    schema["x-note"] = {"count": -big}
    constraint = compiler.json_final(schema)
    feed(constraint, '<|channel|>final<|message|>{"n": 7}<|return|>')
    assert constraint.is_finished


def test_compiled_grammars_are_cached_and_masks_have_the_vocabulary_size(compiler):
    schema = obj({"cache_probe": string()})
    compiler.json_final(schema)
    compiled = compiler.compiled
    constraint = compiler.json_final(schema)
    assert compiler.compiled == compiled
    mask = constraint.allowed_tokens()
    assert mask.dtype == torch.bool and mask.shape == (VOCAB_SIZE,) and mask.nonzero().flatten().tolist() == [CHANNEL]


# -- budgets and limits (findings of the structured-output hunt) ------------------------------------

MANY_OPTIONAL = {"type": "object", "properties": {f"prop_{i}": {"type": "string"} for i in range(600)},
                 "additionalProperties": False}
NODE = {"$defs": {"node": obj({"name": string(8), "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}})},
        "$ref": "#/$defs/node"}


def test_a_schema_with_600_optional_properties_runs(compiler):
    """llguidance's default parser limit (2000 items a row) failed at the answer's first token: a 500 mid-answer."""
    constraint = compiler.json_final(MANY_OPTIONAL, reasoning_budget=20, max_tokens=400)
    feed(constraint, '<|channel|>final<|message|>{"prop_7":"y","prop_599":"x"}<|return|>')
    assert constraint.is_finished
    call = compiler.tools({"wide": MANY_OPTIONAL}, "auto")
    feed(call, '<|channel|>commentary to=functions.wide <|constrain|>json<|message|>{"prop_3":"z"}<|call|>')


WIDEST = {"type": "object", "properties": {f"prop_{i}": {"type": "string"} for i in range(5000)}, "additionalProperties": False}


def test_a_schema_with_5000_optional_properties_runs_through_whitespace_runs(compiler):
    """OpenAI's most properties. A whitespace run inside the object makes a mask visit a row per length the run may
    still end at: after `{\\n\\n\\n    \\t` the mask needed more than 300,000 items (the demo model's answer: a 500
    mid-answer, "Too many items"). The schema check now computes such a mask, so a limit is a 400 before generation."""
    constraint = compiler.json_final(WIDEST, max_tokens=120)
    feed(constraint, '<|channel|>analysis<|message|>JSON.<|end|><|start|>assistant<|channel|>final<|message|>{\n\n\n    \t')
    feed(constraint, ' ' * 10 + '\n"prop_4999"\r\n:' + ' ' * 12 + '"x"' + ' ' * 14 + '}<|return|>')
    assert constraint.is_finished


def test_a_parser_limit_is_a_grammar_error_before_generation(compiler, monkeypatch):
    import llguidance
    from ossrun.engine import constraints

    monkeypatch.setattr(constraints, "_LIMITS", llguidance.LLParserLimits(verbose_errors=False))  # the library's
    fresh = ConstraintCompiler(llguidance_tokenizer())
    try:
        for grammar in (harmony_grammar.json_final(MANY_OPTIONAL, max_tokens=60), harmony_grammar.tools({"wide": MANY_OPTIONAL}, "auto"),
                        harmony_grammar.json_final(obj({"inner": MANY_OPTIONAL}), max_tokens=60)):
            with pytest.raises(GrammarError, match="Current row has"):
                fresh.compile(grammar)
    finally:
        fresh.close()


@pytest.mark.parametrize("pattern", [r"^.{0,1000}a.{100}$", r"^.{0,100}a.{20}$", r".{0,1000}a.{100}", r".{0,50}a.{10}"])
def test_a_pattern_whose_lexer_explodes_is_a_grammar_error_before_generation(compiler, pattern):
    """Such a pattern's automaton tracks every position the letter may have been at: generation filled llguidance's
    lexer (250,000 states) and failed mid-answer with a 500 after up to two minutes (hunt_security #2). Unanchored, as
    JSON Schema's patterns are, it fails on llguidance's other lexer limit ("too many expressions", hunt_engine #1)."""
    schema = obj({"a": {"type": "string", "pattern": pattern}})
    with pytest.raises(GrammarError, match="too complex for the grammar engine"):
        compiler.json_final(schema, max_tokens=64)
    with pytest.raises(GrammarError, match="too complex"):  # anywhere in the schema, and for tools too
        compiler.tools({"f": obj({"items": {"type": "array", "items": {"type": "string", "pattern": pattern}}})}, "auto")


def test_common_patterns_pass_the_lexer_probe(compiler):
    patterns = [r"^\d{4}-\d{2}-\d{2}$", r"^[^@\s]+@[^@\s]+\.[^@\s]+$", r"^https?://[^\s/$.?#].[^\s]*$", r"^.{1,1000}$",
                r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", r"^(\w+\s?){1,50}$", r"^[\s\S]{0,5000}$"]
    compiler.json_final(obj({f"p{i}": {"type": "string", "pattern": p} for i, p in enumerate(patterns)}))


def test_the_pattern_probe_leaves_bad_patterns_to_the_schemas_own_compile(compiler):
    """A pattern where a lenient schema ignores it (inside `not`) never reaches generation: accepted as before the probe."""
    compiler.json_final(obj({"a": {"type": "string", "not": {"pattern": "("}}}), strict=False)
    with pytest.raises(GrammarError, match="unclosed group"):  # where generation uses it, the compile refuses it
        compiler.json_final(obj({"a": {"type": "string", "pattern": "("}}), strict=False)


def test_a_full_lexer_is_renewed_not_an_error_for_every_later_request(compiler, monkeypatch):
    """llguidance's lexer states are shared by every copy of a compiled grammar and add up over its life: once at the
    limit, every request with the cached format failed ("too many states"). A limit of 10,000 (not 250,000) makes
    this quick; before the renewal the 5th request of this format failed."""
    import random

    import llguidance
    from ossrun.engine import constraints

    monkeypatch.setattr(constraints, "_LIMITS", llguidance.LLParserLimits(
        verbose_errors=False, max_items_in_row=30_000, step_max_items=2_000_000, max_lexer_states=10_000))
    fresh = ConstraintCompiler(llguidance_tokenizer(), workers=1)
    grammar = harmony_grammar.json_final(obj({"note": {"type": "string", "pattern": r"^.{0,50}a.{10}$"}}), reasoning_budget=4)
    rng = random.Random(0)
    try:
        for _ in range(16):
            constraint = fresh.compile(grammar)
            for _ in range(48):
                take(constraint, lambda mask: rng.choice(mask.nonzero().flatten().tolist()))  # `choose` ends the reasoning
                if constraint.is_finished:
                    break
    finally:
        fresh.close()



# RFC 3339's grammar: date-fullyear is any 4 digits. The `rfc3339-validator` package (which jsonschema's FormatChecker uses
# when it is installed, as openapi-spec-validator installs it) also wants a calendar date Python can hold, so it refuses
# year 0000, which the grammar's `date-time` allows and these tests' lowest-token walks write.
RFC3339 = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt]([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?"
                     r"([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)$")


def rfc3339_checker() -> jsonschema.FormatChecker:
    """jsonschema's FormatChecker with `date-time` checked by RFC 3339's grammar, whichever packages are installed."""
    checker = jsonschema.FormatChecker()
    checker.checkers.pop("date-time", None)
    checker.checks("date-time")(lambda value: not isinstance(value, str) or bool(RFC3339.match(value)))
    return checker

@pytest.mark.parametrize("schema", [
    obj({"n": integer(3, 7)}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}),
    obj({"when": {"type": "string", "format": "date-time"}}),
    obj({"mail": {"type": "string", "format": "email"}}),
    obj({f"field_{i}": {"type": "integer"} for i in range(30)}),
])
def test_the_budget_holds_for_schemas_the_old_search_could_not_complete(compiler, schema, monkeypatch):
    """The search spells digits, letters and punctuation the mask allows, so the budget is known (was: none found, no forcing)."""
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", 60.0)  # the search ends by itself: on a loaded CI machine 2 s ran out (401 tokens of 400)
    with pytest.raises(GrammarError, match="max_tokens 5 cannot"):
        compiler.json_final(schema, reasoning_budget=0, max_tokens=5)
    constraint = compiler.json_final(schema, reasoning_budget=180, max_tokens=400)
    tokens = feed(constraint, "<|channel|>analysis<|message|>" + "think " * 100)
    while not constraint.is_finished and len(tokens) <= 400:  # the lowest allowed token: long answers the budget must close
        tokens.append(take(constraint, lowest))
    assert len(tokens) <= 400
    jsonschema.validate(json.loads(parse_completion(tokens).content), schema, format_checker=rfc3339_checker())


def test_required_with_two_tools_has_a_budget(compiler):
    weather = obj({"city": string()})
    with pytest.raises(GrammarError, match="max_tokens 3 cannot"):
        compiler.tools({"get_weather": weather, "get_news": obj({"topic": string()})}, "required", max_tokens=3)


@pytest.mark.parametrize("schema", [
    {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}}, "$ref": "#/$defs/n"},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1000000},
    {"type": "string", "minLength": 100000},
])
def test_a_format_without_a_bounded_answer_runs_without_the_guarantee(compiler, schema, monkeypatch, caplog):
    """The beam finding no answer proves nothing (it drops states), and trying every token is too large here: not a 400
    (the rule that keeps a real answer that fits from being refused), the log says the budget is not guaranteed."""
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", 120.0)  # the search ends by itself; a busy machine must not matter
    with caplog.at_level("WARNING", logger="ossrun.engine.constraints"):
        assert compiler.json_final(schema, max_tokens=300).allowed_tokens().any()
    assert "no complete answer of at most 300 tokens found, and too many to try them all" in caplog.text


@pytest.mark.parametrize("schema", [
    obj({"when": {"type": "string", "format": "date-time"}}),
    obj({"mail": {"type": "string", "format": "email"}}),
    obj({"id": {"type": "string", "format": "uuid"}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}),
])
def test_common_formats_fit_a_moderate_budget(compiler, schema, monkeypatch):
    """The search spelled a format one character at a time and its beam filled with whitespace runs: a date-time took
    61 tokens, so max_tokens 40 to 60 was a false 400 though the answer takes about 20. It now takes the digit runs
    o200k has (`200`, `01`) and tries whitespace last; and a beam that finds none within the budget refuses nothing."""
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", 60.0)  # as above: on a loaded CI machine 2 s ran out (41 tokens of 40)
    constraint = compiler.json_final(schema, reasoning_budget=0, max_tokens=40)
    tokens = []
    while not constraint.is_finished and len(tokens) <= 40:  # the lowest allowed token each time: the budget must close it
        tokens.append(take(constraint, lowest))
    assert len(tokens) <= 40
    jsonschema.validate(json.loads(parse_completion(tokens).content), schema, format_checker=rfc3339_checker())
    for budget in (50, 60):
        compiler.json_final(schema, reasoning_budget=0, max_tokens=budget)


EMAIL_PATTERN = r"^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}$"


@pytest.mark.parametrize("pattern", [
    EMAIL_PATTERN,
    r"^cus_[A-Za-z0-9]{14,24}$",
    r"^[A-Z][^.!?]{0,300}[.!?]$",
    r"^[A-Za-z0-9 ,.'-]{1,100}, [A-Z]{2} \d{5}$",
    r"^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$",
])
def test_a_string_pattern_gets_the_budget_guarantee(compiler, pattern):
    """hunt_engine #3: within a pattern's string nearly every character leaves the mask as it was (after `x@x`, `x@x.`
    and `x@x.c` alike), so the search, trying one character at a time, never wrote `.` and two letters in a row: the
    usual e-mail regex found no answer even in 60 s, requests ran without the guarantee and ended cut mid-string.
    The search now also tries to close such a string with the end of a short string the pattern matches."""
    schema = obj({"v": {"type": "string", "pattern": pattern}})
    constraint = compiler.json_final(schema, reasoning_budget=0, max_tokens=30)  # the search's own time limit
    assert constraint._path is not None and len(constraint._path) <= 20
    tokens = []
    while not constraint.is_finished and len(tokens) <= 30:  # the lowest allowed token each time: the budget must close it
        tokens.append(take(constraint, lowest))
    assert len(tokens) <= 30
    jsonschema.validate(json.loads(parse_completion(tokens).content), schema)


def test_a_pattern_string_the_model_began_is_closed_within_the_budget(compiler):
    """What the model wrote in hunt_engine #3 (cut there, invalid JSON): with 12 tokens left the guard closes it."""
    schema = obj({"contact": {"type": "string", "pattern": EMAIL_PATTERN}})
    constraint = compiler.json_final(schema, reasoning_budget=0, max_tokens=40)
    tokens = feed(constraint, '<|channel|>final<|message|>{"contact": "Ukraine25.oria.10model15-02-0-0-9.-0.')
    while not constraint.is_finished and len(tokens) <= 40:
        tokens.append(take(constraint, lambda mask: encode("-0")[0] if mask[encode("-0")[0]] else lowest(mask)))
    assert len(tokens) <= 40
    jsonschema.validate(json.loads(parse_completion(tokens).content), schema)


@pytest.mark.parametrize("pattern, sample", [
    (EMAIL_PATTERN, "a@a.aa"), (r"^(GET|POST)$", "GET"), (r"^[^@]{1,64}@example\.com$", "a@example.com"),
    (r"^#?([a-fA-F0-9]{6}|[a-fA-F0-9]{3})$", "aaa"), (r"^\d{4}-\d{2}(:\d{2})?Z\.pdf$", "0000-00Z.pdf"),
    (r"(?=a)b", None), (r"\bword", None), (r"^\p{L}+$", None),
])
def test_pattern_samples_are_shortest_matches_or_none(pattern, sample):
    assert pattern_sample(pattern) == sample


def test_a_budget_too_small_is_refused_only_when_proven(compiler):
    """A 400 needs every token the masks allow tried (max_tokens 5 for a small object, 3 for two tools). Three required
    date-times at 40: the beam finds no answer and the proof is too large: no 400, run without the guarantee."""
    with pytest.raises(GrammarError, match="there is no complete answer of at most 5 tokens"):
        compiler.json_final(obj({"n": integer(3, 7)}), reasoning_budget=0, max_tokens=5)
    three = obj({f"d{i}": {"type": "string", "format": "date-time"} for i in range(3)})
    assert compiler.json_final(three, reasoning_budget=0, max_tokens=40).allowed_tokens().any()


def test_a_search_out_of_time_runs_without_the_guarantee_and_is_not_a_400(compiler, monkeypatch):
    """Out of time is not "no answer": refusing then would make a valid request's answer depend on how busy the
    machine is (and, cached, refuse the format for good). Later requests of the format skip the search (2 s each) for a
    while (see the next test)."""
    schema = obj({"k": integer(4, 6), "note": string(3)})
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", -1.0)
    assert compiler.json_final(schema, reasoning_budget=0, max_tokens=40).allowed_tokens().any()
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", 120.0)
    for budget in (40, 4):  # not refused, not searched again (budget 4 would be a 400 had it been)
        assert compiler.json_final(schema, reasoning_budget=0, max_tokens=budget).allowed_tokens().any()
    with pytest.raises(GrammarError, match="max_tokens 4 cannot"):  # the same format, searched in time: refused
        compiler.json_final(obj({"k": integer(4, 6), "note": string(4)}), reasoning_budget=0, max_tokens=4)


def test_a_search_out_of_time_is_tried_again_later_less_often_each_time(compiler, monkeypatch):
    """Hunt round 19 B-F2: one search that ran out of time (the machine busy when the format was first used) turned the
    guard off for that format until a restart: hours later, on an idle machine, its answers still ended cut at
    max_tokens, invalid JSON. Now a later request searches again once a wait has passed, twice as long after each
    search that runs out again (a format whose search always runs out costs a request its 2 s only now and then)."""
    now = [1000.0]  # the retry waits' clock, stepped by hand: a busy machine cannot make the steps overlap
    monkeypatch.setattr(constraints, "_clock", lambda: now[0])
    found = counted_searches(monkeypatch, most=50)
    schema = obj({"k": integer(4, 6), "retried": string(5)})
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", -1.0)
    for _ in range(2):  # the first runs out (10 s to wait), the second skips it
        assert compiler.json_final(schema, reasoning_budget=0, max_tokens=40).allowed_tokens().any()
    assert found == [False]
    now[0] += 10.5
    compiler.json_final(schema, reasoning_budget=0, max_tokens=40)  # searched again, out of time again: 20 s to wait
    assert found == [False, False]
    monkeypatch.setattr(budget_search, "_SEARCH_SECONDS", 120.0)
    now[0] += 19
    assert compiler.json_final(schema, reasoning_budget=0, max_tokens=4).allowed_tokens().any()  # still waiting
    assert len(found) == 2
    now[0] += 1.5
    with pytest.raises(GrammarError, match="max_tokens 4 cannot"):  # searched in time: the guard holds again
        compiler.json_final(schema, reasoning_budget=0, max_tokens=4)
    assert len(found) == 3


def test_a_token_that_lengthens_the_path_cannot_cut_the_answer(compiler):
    """Recursive schema, seeded random choices (mostly structural tokens): every answer closes in max_tokens
    (was: seed 25 ended cut: with a few tokens left the path was short, `{"` made it longer than what was left)."""
    import random

    small = harmony_grammar._path_tokens(NODE)
    for seed in range(20, 30):
        rnd, tokens = random.Random(seed), []
        constraint = compiler.json_final(NODE, reasoning_budget=0, max_tokens=60)
        def pick(mask):
            allowed = mask.nonzero().flatten().tolist()
            structural = [t for t in allowed if t in small]
            return rnd.choice(structural) if structural and rnd.random() < 0.7 else rnd.choice(allowed)

        while not constraint.is_finished and len(tokens) < 60:
            tokens.append(take(constraint, pick))
        assert constraint.is_finished, seed
        jsonschema.validate(json.loads(parse_completion(tokens).content), NODE)


def test_near_the_end_a_token_is_kept_while_the_answer_still_fits(compiler):
    """The guard allowed only its own path's token and a fixed set of closers near the end of max_tokens: `Tokyo` in
    `{"city": "Tokyo"}` (7 tokens with `<|call|>`) was refused even at max_tokens 20, and the call came back
    `{"city" \\t   :""}`. Now the token the model chose is kept when a complete answer fits after it, else the next
    choices are tried (`resample`), and the answer, still valid and within max_tokens, is marked cut."""
    schema = obj({"city": {"type": "string"}})
    tokyo = encode("Tokyo")
    assert len(tokyo) == 1
    for budget, fits in ((7, True), (20, True), (6, False)):
        constraint = compiler.engine.compile(harmony_grammar.arguments("get_weather", schema, max_tokens=budget))
        tokens = feed(constraint, '{"city": "')
        assert constraint.guarding
        offered = []
        token = constraint.choose(tokyo[0], lambda mask: offered.append(mask) or lowest(mask))
        assert (token == tokyo[0], not offered, constraint.cut) == (fits, fits, not fits), budget
        if not fits:
            assert not offered[0][tokyo[0]] and offered[0].sum() > 1  # refused; the rest of the mask stays on offer
        constraint.advance(token)
        tokens.append(token)
        rest = encode('"}<|call|>', allow_special=True)  # what the model writes next; where it does not fit, the lowest token
        while not constraint.is_finished and len(tokens) <= budget:
            tokens.append(take(constraint, lambda mask: rest.pop(0) if fits else lowest(mask)))
        whole = parse_completion(tokens, prompt_ids=encode("<|start|>assistant<|channel|>commentary to=functions.get_weather "
                                                           "<|constrain|>json<|message|>", allow_special=True))
        assert len(tokens) <= budget and json.loads(whole.tool_calls[0].arguments).keys() == {"city"}
        assert (whole.tool_calls[0].arguments == '{"city": "Tokyo"}', constraint.cut) == (fits, not fits)


UNIQUE_TAGS = obj({"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2, "uniqueItems": True},
                   "other": {"not": {"type": "null"}, "type": "integer", "minimum": 0, "maximum": 9}})


def test_a_schema_that_is_not_strict_ignores_keywords_not_implemented(compiler):
    """OpenAI restricts the schema language only for `strict: true`; a non-strict tool or format with `uniqueItems`
    or `not` was a 400. Now its supported part constrains the output; strict keeps the clear refusal."""
    with pytest.raises(GrammarError, match="uniqueItems"):
        compiler.json_final(UNIQUE_TAGS, max_tokens=200)
    constraint = compiler.json_final(UNIQUE_TAGS, max_tokens=200, strict=False)
    feed(constraint, '<|channel|>final<|message|>{"tags":["a"],"other":3}<|return|>')
    assert constraint.is_finished
    with pytest.raises(GrammarError, match="uniqueItems"):
        compiler.tools({"tagger": UNIQUE_TAGS}, "auto")
    call = compiler.tools({"tagger": UNIQUE_TAGS, "search": SEARCH}, "auto", lenient={"tagger"})
    feed(call, '<|channel|>commentary to=functions.tagger <|constrain|>json<|message|>{"tags":[],"other":')
    assert not call.allowed_tokens()[encode('"')[0]]  # the supported part (an integer) still holds
    arguments = compiler.engine.compile(harmony_grammar.arguments("tagger", UNIQUE_TAGS, max_tokens=100, strict=False))
    feed(arguments, '{"tags":["b"],"other":0}<|call|>')
    with pytest.raises(GrammarError, match="Invalid type"):  # what lenient mode cannot ignore stays an error
        compiler.json_final({"type": "no-such-type"}, strict=False)
