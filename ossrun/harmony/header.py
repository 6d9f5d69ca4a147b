"""Lenient parsing of a harmony message header (the part between `<|start|>` and `<|message|>`).

The canonical shapes are `assistant<|channel|>final` and
`assistant to=functions.NAME<|channel|>commentary <|constrain|>json`, but models (and other
servers' fixes) produce variants: the recipient after the channel, `json` without
`<|constrain|>`, `<|channel|>` repeated or glued to the tool name, the role missing. The header is
read as a sequence of recognised pieces in any order; whatever follows the last recognised piece
is returned as `rest`, which the parser treats as message text when `<|message|>` never came
(less the special tokens in it: the parser knows which bytes they spelled).
Special tokens arrive spelled out (`<|channel|>`), so a special token and its spelling as
ordinary text are read alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CHANNELS = ("analysis", "commentary", "final")
# Recipients that address a person, not a tool: a message to them is no tool call.
NON_TOOL_RECIPIENTS = ("assistant", "user", "system", "developer", "all")

_PIECE = re.compile(
    r"""
    (?P<space>\s+)
  | <\|channel\|>[ \t]*(?P<channel>[A-Za-z_]+)?
  | to=(?P<recipient>[A-Za-z0-9_.:/\-]+)
  | <\|constrain\|>[ \t]*(?P<constrain>[A-Za-z0-9_.:/+\-]+)?
  | (?P<bare_type>json|code)(?=\s|<|$)
  | (?P<word>[A-Za-z_][A-Za-z0-9_.\-]*)
    """,
    re.VERBOSE,
)

# How a header cut short by max_tokens may end: the start of a piece whose pattern needs more than was written
# (` to` or ` to=` before the recipient's name, a bare `js` before `json`). Read as text it would be markup in the answer.
PARTIAL_PIECES = ("to=", "json", "code")


@dataclass(slots=True)
class Header:
    """What a header says, plus the oddities met while reading it."""

    role: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    rest: str = ""
    anomalies: list[str] = field(default_factory=list)

    @property
    def tool_name(self) -> str | None:
        """The function called when the recipient is a tool, without the `functions.` namespace."""
        if not self.recipient or self.recipient in NON_TOOL_RECIPIENTS:
            return None
        return self.recipient.removeprefix("functions.") or None


def parse_header(text: str, *, has_role: bool, cut: bool = False) -> Header:
    """Read `text` piece by piece; `has_role` says the header began after `<|start|>` (so with a role). `cut`:
    generation stopped inside the header, so a last piece may be unfinished (`PARTIAL_PIECES`): it is header, not rest."""
    header = Header()
    pos = 0
    while pos < len(text):
        m = _PIECE.match(text, pos)
        if m is None or not _take(header, m, first=pos == 0, has_role=has_role):
            break
        pos = m.end()
    if cut and pos < len(text) and any(piece.startswith(text[pos:]) for piece in PARTIAL_PIECES):
        pos = len(text)
    recognised = header.role or header.channel or header.recipient or header.content_type
    # Whitespace separates header pieces from text; without any piece it is part of the text.
    header.rest = text[pos:] if recognised else text
    _check(header, has_role)
    return header


def _take(header: Header, m: re.Match[str], *, first: bool, has_role: bool) -> bool:
    """Apply one piece to the header; False when the piece is no header piece (the rest is text)."""
    kind = m.lastgroup
    if kind == "space":
        return True
    if kind == "word":
        # A bare word is the role only at the very start of a header that has one.
        if first and (has_role or m.group() == "assistant"):
            header.role = m.group()
            return True
        return False
    if m.group().startswith("<|channel|>"):
        _take_channel(header, m.group("channel"))
    elif kind == "recipient":
        if header.recipient is not None and header.recipient != m.group("recipient"):
            header.anomalies.append(f"header names two recipients: {header.recipient!r} and {m.group('recipient')!r}")
        header.recipient = header.recipient or m.group("recipient")
    elif m.group().startswith("<|constrain|>") or kind == "bare_type":
        if header.channel is None and header.recipient is None and kind == "bare_type":
            return False  # `json` at the start of a header-less message is text
        header.content_type = header.content_type or m.group("constrain") or m.group("bare_type")
    return True


def _take_channel(header: Header, name: str | None) -> None:
    if header.channel is not None:
        header.anomalies.append(f"<|channel|> repeated in the header (kept {header.channel!r})")
    elif name in CHANNELS:
        header.channel = name
    else:
        header.anomalies.append(f"unknown channel {name!r}")


def _check(header: Header, has_role: bool) -> None:
    if has_role and header.role is None:
        header.anomalies.append("header without a role")
    elif header.role not in (None, "assistant"):
        header.anomalies.append(f"message from {header.role!r} instead of the assistant")
    if header.channel is None:
        header.anomalies.append("header without a channel")
    if header.tool_name and not header.recipient.startswith("functions."):
        header.anomalies.append(f"recipient {header.recipient!r} is outside the functions namespace")
