"""Structured output's budget search alone (no model, no server): its time and path length per format.

    python bench/budget_search.py [--seconds S] [--only NAME ...]

For each case (a string format as `{"v": <format>}` with max_tokens 60, or objects nested as in the tests), a fresh
compile as a final JSON answer (reasoning budget 0, so the path is the answer's header, the JSON and `<|return|>`),
then its budget search from the start state (`_Entry.shortest`, as a request's compile runs it) under the search's own
time limit (`_SEARCH_SECONDS`, or --seconds): the time it took, the masks it computed, and the path's length in tokens
and its text, or why it found none. Each case compiles afresh: llguidance's lexer states are shared by a compiled
grammar's copies, so a second search of the same grammar would be faster than the first one a request pays for.
"""

from __future__ import annotations

import argparse
import time

from ossrun.engine import budget_search
from ossrun.engine.constraints import ConstraintCompiler, SearchTimeout
from ossrun.harmony import grammar as harmony_grammar
from ossrun.harmony.grammar import llguidance_tokenizer

def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _nested(depth: int, leaf: dict) -> dict:
    """Objects `depth` deep, one required property each, as in tests/test_constraints.py."""
    for level in range(depth):
        leaf = {"type": "object", "properties": {f"k{level}": leaf}, "required": [f"k{level}"]}
    return leaf


_TEXT = {"type": "string", "maxLength": 12}
_ADDRESS = _object({"street": _TEXT, "city": _TEXT, "geo": _object({"lat": {"type": "number"}, "lon": {"type": "number"}})})
_ORDER = _object({"id": _TEXT, "customer": _object({"name": _TEXT, "address": _ADDRESS}),
                  "items": {"type": "array", "minItems": 1, "items": _object({"sku": _TEXT, "qty": {"type": "integer"}})}})
# A string format as `{"v": …}` (max_tokens 60), or a whole schema with its max_tokens.
CASES: dict[str, dict | tuple[dict, int]] = {
    "format-email": {"type": "string", "format": "email"},
    "format-date-time": {"type": "string", "format": "date-time"},
    "format-uuid": {"type": "string", "format": "uuid"},
    "code": {"type": "string", "pattern": r"^[A-Z]{3}-[0-9]{4}$"},
    "email": {"type": "string", "pattern": r"^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}$"},
    "simple-email": {"type": "string", "pattern": r"^[a-z]+@x\.com$"},
    "stripe": {"type": "string", "pattern": r"^cus_[A-Za-z0-9]{14,24}$"},
    "sentence": {"type": "string", "pattern": r"^[A-Z][^.!?]{0,300}[.!?]$"},
    "example-mail": {"type": "string", "pattern": r"^[^@]{1,64}@example\.com$"},
    "address": {"type": "string", "pattern": r"^[A-Za-z0-9 ,.'-]{1,100}, [A-Z]{2} \d{5}$"},
    "hostname": {"type": "string", "pattern": r"^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"},
    "lower-dot": {"type": "string", "pattern": r"^[a-z ]{0,200}\.$"},
    "pdf": {"type": "string", "pattern": r"^.{1,100}\.pdf$"},
    "nested-8": (_nested(8, {"type": "string", "maxLength": 5}), 100),
    "nested-16": (_nested(16, {"type": "string", "maxLength": 5}), 150),
    "nested-32": (_nested(32, {"type": "string", "maxLength": 5}), 150),
    "order-in-6": (_nested(6, _ORDER), 200),
}


def measure(compiler: ConstraintCompiler, name: str) -> str:
    case = CASES[name]
    schema, max_tokens = case if isinstance(case, tuple) else (_object({"v": case}), 60)
    grammar = harmony_grammar.json_final(schema, reasoning_budget=0, max_tokens=max_tokens)
    matcher, entry = compiler._compile((grammar.lark, grammar.path_tokens, time.monotonic()), grammar)
    masks = 0
    settle = budget_search._Node.settle

    def counted(node, *args, **kwargs):
        nonlocal masks
        masks += 1
        return settle(node, *args, **kwargs)

    budget_search._Node.settle = counted
    start = time.monotonic()
    try:
        path = entry.shortest(matcher, grammar, compiler.tokenizer, compiler._runs)
        text = compiler.tokenizer.decode_str(path or [])
        found = "proven: none" if path is None else f"{len(path):3d} tokens  {text if len(text) < 90 else text[:87] + '...'!r}"
    except SearchTimeout as exc:
        found = f"none: {exc}"
    finally:
        budget_search._Node.settle = settle
    return f"{name:17s} {time.monotonic() - start:6.2f} s {masks:6d} masks  {found}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=budget_search._SEARCH_SECONDS)
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    budget_search._SEARCH_SECONDS = args.seconds
    compiler = ConstraintCompiler(llguidance_tokenizer())
    print(f"search limit {args.seconds:g} s")
    for name in args.only:
        print(measure(compiler, name), flush=True)
    compiler.close()


if __name__ == "__main__":
    main()
