"""Reading a JSON body safely: every malformed body is a 400, never a 500.

`json.loads` recurses (a body nested a thousand deep raises `RecursionError`), and JSON may spell
lone UTF-16 surrogates (`"\\ud800"`) that Python keeps in a `str` but that no encoder can write,
so they fail far away (the tokenizer, the response). Both are refused here, once, at the edge, as are
Python's `NaN`, `Infinity` and `-Infinity` literals, which are not JSON (RFC 8259; `JSON.parse` refuses them).
"""

from __future__ import annotations

import json
from typing import Any

from ossrun.api.errors import bad_input

# No legitimate body nests deeper; tool parameter schemas have their own, smaller limit (harmony).
MAX_DEPTH = 128


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")


def parse_json(raw: bytes) -> Any:
    """The body's JSON value, or a 400 saying what is wrong with it."""
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise bad_input(f"Error: the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # also UnicodeDecodeError: bytes that are not UTF-8
        raise bad_input("Error: the body is not valid JSON") from None
    check_value(value)
    return value


def check_value(value: Any) -> None:
    """Iteratively (a recursive walk would fail on exactly the bodies it must refuse): depth and strings."""
    stack = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise bad_input(f"Error: at '{where or '/'}': the body nests deeper than {MAX_DEPTH} levels")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str):
                    _check_text(key, where)
                stack.append((child, depth + 1, f"{where}/{key}"))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_input(f"Error: at '{where or '/'}': the string holds a lone UTF-16 surrogate (not valid Unicode)") from None
