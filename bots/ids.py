"""Platform ids that people type (in commands and in the configuration), checked once.

An id that no platform could ever send (`0`, 5000 digits, a negative user id) must be
refused before it is stored, or it sits in the roles table for ever and shows up in
`/admins`. The rules are the platforms' own:

- Telegram: user ids are positive and fit in a signed 64-bit integer (they are below
  2^52 today); group and channel chat ids are negative (`-100...` for supergroups).
- Discord: every id is a snowflake, an unsigned 64-bit integer (never 0).
- The console: a short name.
"""

from __future__ import annotations

import re

_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1
_DIGITS = re.compile(r"[1-9][0-9]*")  # no sign, no leading zero
_MAX_DIGITS = 20  # 2^64 has 20 digits; longer is too large (and int() refuses > 4300 digits)
_CONSOLE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def user_id_problem(platform: str, ident: str) -> str | None:
    """Why `ident` cannot be a user id on `platform` (one short sentence), or None if it can."""
    if platform == "console":
        return None if _CONSOLE.fullmatch(ident) else "a console user is a short name"
    if not _DIGITS.fullmatch(ident):
        return f"a {platform} user id is a positive whole number"
    limit = _INT64_MAX if platform == "telegram" else _UINT64_MAX
    if len(ident) > _MAX_DIGITS or int(ident) > limit:
        return f"that number is too large for a {platform} user id"
    return None


def chat_id_problem(platform: str, ident: str) -> str | None:
    """Why `ident` cannot be a chat id on `platform`, or None if it can."""
    if platform == "telegram":
        number = ident[1:] if ident.startswith("-") else ident
        if not _DIGITS.fullmatch(number) or len(number) > _MAX_DIGITS or int(number) > _INT64_MAX:
            return "a telegram chat id is a whole number like -1001234567890"
        return None
    if platform == "discord":
        if not _DIGITS.fullmatch(ident) or len(ident) > _MAX_DIGITS or int(ident) > _UINT64_MAX:
            return "a discord channel id is a positive whole number (a snowflake)"
        return None
    return user_id_problem(platform, ident)


def one_line(text: str, limit: int) -> str:
    """`text` on one line -- control characters and runs of whitespace become one space --
    cut to `limit` characters with "…": what a chat may show of text it does not control
    (someone's input, a tool's arguments or error)."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if len(flat) > limit:
        flat = flat[: limit - 1].rstrip() + "…"
    return flat


def quote_input(text: str, limit: int = 40) -> str:
    """A short, single-line, quoted piece of what someone typed, safe to echo in a chat.

    Command answers that name the user's input ("Unknown model ...") never repeat more
    than `limit` characters of it, and never its line breaks or control characters: a
    5,000-character argument is not echoed back, and nothing typed can shape the reply.
    """
    return f"'{one_line(text, limit)}'"
