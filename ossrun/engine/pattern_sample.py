"""A shortest string a JSON Schema `pattern` matches, for the budget search (`budget_search._Node.ending`).

Within a string that follows a pattern nearly every character leaves the token mask as it was, so a search that needs
the mask to change to see progress cannot find the way out; the end of a sample, then the closing quote, shows it one.
Pure text: no grammar engine, no torch.
"""

from __future__ import annotations

# What a pattern's sample string uses where the pattern lets it choose (a class, `.`): plain characters first.
_PLAIN = "aA0 -._" + "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "\"\\aA0-._")
_ESCAPES = {"d": "0", "w": "a", "s": " ", "D": "a", "W": " ", "S": "a", "n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
_CLASS_ESCAPES = {"d": "0123456789", "w": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", "s": " \t\n\r"}


def pattern_sample(pattern: str) -> str | None:
    """A shortest string the regex matches (each repeat at its least, the shortest branch, a plain character for a
    class), or None for syntax this reader does not know (lookarounds, `\\b`, `\\p{…}`, backreferences). Within a
    string that follows a pattern nearly every character leaves the mask as it was: after `x@x` the mask is the same
    as after `x@x.` and `x@x.c` (only the closing quote tells them apart, and it is allowed after `x@x.co` only), so
    the search, which needs the mask to change to see progress, walked its list of characters and ran out of time.
    The end of a sample, then the closing quote, shows it a way out (see `_Node.ending`)."""
    try:
        sample, end = _alternatives(pattern, 0)
    except (ValueError, IndexError):
        return None
    return sample if end == len(pattern) else None


def _alternatives(pattern: str, i: int) -> tuple[str, int]:
    branches = []
    while True:
        branch, i = _sequence(pattern, i)
        branches.append(branch)
        if i == len(pattern) or pattern[i] != "|":
            return min(branches, key=len), i
        i += 1


def _sequence(pattern: str, i: int) -> tuple[str, int]:
    out = ""
    while i < len(pattern) and pattern[i] not in "|)":
        atom, i = _atom(pattern, i)
        times, i = _least_repeats(pattern, i)
        out += atom * times
    return out, i


def _atom(pattern: str, i: int) -> tuple[str, int]:
    char = pattern[i]
    if char == "(":
        if pattern.startswith("(?", i):  # a group without capture or with a name: lookarounds are not read
            close = {"(?:": i + 3, "(?<": pattern.find(">", i) + 1, "(?P": pattern.find(">", i) + 1}.get(pattern[i:i + 3], 0)
            if close <= i or pattern.startswith(("(?<=", "(?<!"), i):
                raise ValueError(pattern[i:i + 4])
            i = close - 1
        inner, i = _alternatives(pattern, i + 1)
        if pattern[i] != ")":
            raise ValueError("unclosed group")
        return inner, i + 1
    if char == "[":
        return _class_sample(pattern, i)
    if char == "\\":
        escaped = pattern[i + 1]
        if escaped in _ESCAPES:
            return _ESCAPES[escaped], i + 2
        if escaped in "ux":
            digits = 4 if escaped == "u" else 2
            return chr(int(pattern[i + 2:i + 2 + digits], 16)), i + 2 + digits
        if escaped.isalnum():
            raise ValueError(f"\\{escaped}")
        return escaped, i + 2
    if char in "^$":
        return "", i + 1
    if char in "*+?{":
        if char == "{" and _least_repeats(pattern, i)[1] == i:
            return char, i + 1  # a brace that is not a quantifier is itself
        raise ValueError("a quantifier without an atom")
    return ("a" if char == "." else char), i + 1


def _least_repeats(pattern: str, i: int) -> tuple[int, int]:
    """(the least number of times the quantifier at `i` allows, the index after it); (1, i) when there is none."""
    if i == len(pattern) or pattern[i] not in "*+?{":
        return 1, i
    if pattern[i] == "{":
        end = pattern.find("}", i)
        least = pattern[i + 1:end].split(",")[0]
        if end < 0 or not least.isdigit() or not all(c.isdigit() or c == "," for c in pattern[i + 1:end]):
            return 1, i
        times, i = int(least), end + 1
    else:
        times, i = int(pattern[i] == "+"), i + 1
    return times, i + (i < len(pattern) and pattern[i] in "?+")  # lazy or possessive


def _class_sample(pattern: str, i: int) -> tuple[str, int]:
    """A plain character of the class at `i` (`[…]`, `[^…]`), and the index after it."""
    negated = pattern.startswith("[^", i)
    i += 1 + negated
    members, first = [], True
    while pattern[i] != "]" or first:
        first = False
        if pattern[i] == "\\":
            escaped = pattern[i + 1]
            if escaped in "DWS":
                raise ValueError(f"\\{escaped} in a class")
            members.append(_CLASS_ESCAPES.get(escaped) or _ESCAPES.get(escaped, escaped))
            i += 2
        elif pattern[i + 1] == "-" and pattern[i + 2] != "]":
            end = pattern[i + 2] if pattern[i + 2] != "\\" else pattern[i + 3]
            members.append("".join(chr(c) for c in range(ord(pattern[i]), ord(end) + 1)))
            i += 3 + (pattern[i + 2] == "\\")
        else:
            members.append(pattern[i])
            i += 1
    allowed = set("".join(members))
    choices = [c for c in _PLAIN if (c in allowed) != negated] or ([] if negated else sorted(allowed))
    if not choices:
        raise ValueError("an empty class")
    return choices[0], i + 1
