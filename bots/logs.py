"""Logging for a gateway that holds other people's tokens: contextual, readable, redacted.

Three jobs, all done on the root handler so they also cover third-party libraries:

- **Context.** `turn_context(platform=..., chat=..., turn=...)` binds who a turn is for to
  the current task (a `ContextVar`, so tasks spawned inside inherit it); every record
  logged inside -- by parley, the agent or a library -- carries `platform`, `chat` and
  `turn`. Text lines render them as `[telegram chat=123 turn=45]`.
- **Format.** Human-readable text by default, JSON lines with `format="json"`. In text,
  a record's first line starts with its timestamp and any further lines (a traceback, a
  multi-line message) start with `  | `, so tracebacks read as Python prints them and log
  shippers join them by the usual "indented line continues the record" rule. In JSON,
  one record is one line and a traceback is one field, `exc` (with `exc_type`).
- **Redaction.** Every configured secret value, and anything shaped like a token
  (Telegram bot tokens, `Bot`/`Bearer` credentials, Discord tokens, `sk-` keys,
  `token=`/`"api_key": ...` pairs, URL passwords), is replaced with `***` in the message,
  its arguments, the exception text and extra fields -- *before* any handler writes it.
  httpx logs full request URLs and PTB puts the token in the URL path, so this is not
  hypothetical.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Literal, TextIO

from agent.urls import url_without_secrets

__all__ = [
    "CONTEXT_FIELDS",
    "NOISY_LOGGERS",
    "JsonFormatter",
    "LogFormat",
    "Redactor",
    "RedactingFilter",
    "TextFormatter",
    "TurnContextFilter",
    "current_context",
    "redact",
    "reset_logging",
    "setup_logging",
    "url_without_secrets",  # (from agent.urls: what may be shown of a URL)
    "turn_context",
]

LogFormat = Literal["text", "json"]
CONTEXT_FIELDS = ("replica", "platform", "chat", "turn")
MASK = "***"

# Library loggers that are chatty at INFO: (level when parley runs at INFO or above,
# level when it runs at DEBUG). httpx logs one line per request with the full URL
# (PTB's token is in its path); the others announce routine housekeeping.
NOISY_LOGGERS: dict[str, tuple[int, int]] = {
    "httpx": (logging.WARNING, logging.NOTSET),
    "httpcore": (logging.WARNING, logging.INFO),
    "hpack": (logging.WARNING, logging.INFO),
    "aiohttp.access": (logging.WARNING, logging.NOTSET),
    "tornado.access": (logging.WARNING, logging.NOTSET),
    "apscheduler": (logging.WARNING, logging.NOTSET),
    "alembic": (logging.WARNING, logging.NOTSET),
    "httpx2": (logging.WARNING, logging.NOTSET),
    "openai": (logging.WARNING, logging.NOTSET),
    "discord": (logging.WARNING, logging.INFO),
    "aiosqlite": (logging.WARNING, logging.INFO),
    "websockets": (logging.WARNING, logging.INFO),
    "coredis": (logging.WARNING, logging.NOTSET),
    "procrastinate": (logging.WARNING, logging.INFO),
}


# --------------------------------------------------------------------------- context

_CONTEXT: ContextVar[Mapping[str, str]] = ContextVar("parley_log_context", default={})


@contextmanager
def turn_context(
    *, platform: str | None = None, chat: object | None = None, turn: object | None = None
) -> Iterator[None]:
    """Stamp every record logged inside with `platform`, `chat` and `turn`.

    Nests: an inner `turn_context(turn=7)` keeps the outer platform and chat. Works
    across `await`s and is inherited by tasks created inside (contextvars), so a turn's
    provider calls and tool runs are attributed to it without passing ids around.
    """
    merged = dict(_CONTEXT.get())
    for key, value in (("platform", platform), ("chat", chat), ("turn", turn)):
        if value is not None:
            merged[key] = str(value)
    token = _CONTEXT.set(merged)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


_REPLICA: str | None = None


def set_replica(replica_id: str | None) -> None:
    """Cluster mode: stamp every record of this process with its replica id (`replica=`)."""
    global _REPLICA
    _REPLICA = replica_id


def current_context() -> dict[str, str]:
    """The platform/chat/turn bound by the enclosing `turn_context`s (empty outside)."""
    return dict(_CONTEXT.get())


class TurnContextFilter(logging.Filter):
    """Copies the current `turn_context` onto each record (explicit `extra=` values win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _CONTEXT.get()
        for key in CONTEXT_FIELDS:
            if getattr(record, key, None) is None:
                setattr(record, key, _REPLICA if key == "replica" else context.get(key))
        return True


# --------------------------------------------------------------------------- redaction

# Shapes of credentials that must never reach a log even if nobody configured them.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Telegram bot token "<bot id>:<35 chars>", e.g. inside https://api.telegram.org/bot<token>/getMe
    (re.compile(r"\d{6,}:[A-Za-z0-9_-]{30,}"), MASK),
    # Authorization header values: "Bot <discord token>", "Bearer <key>"
    (re.compile(r"\b(Bot|Bearer)(\s+)[A-Za-z0-9._~+/=-]{16,}"), rf"\1\2{MASK}"),
    # Discord bot tokens and JWTs: three base64url segments
    (re.compile(r"[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{20,}"), MASK),
    # OpenAI-style keys: sk-..., sk-proj-...
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), MASK),
    # key/value pairs: "token": "...", api_key=..., secret_token=..., password: ... (JSON, forms, queries)
    (
        re.compile(
            r"""(?i)(\b[\w-]*(?:token|api[_-]?key|apikey|secret|password|passwd|authorization)["']?\s*[:=]\s*["']?)"""
            r"""(?!Bot\s|Bearer\s)([^\s"',;&}\]]{8,})"""
        ),
        rf"\1{MASK}",
    ),
    # passwords in URLs: scheme://user:password@host
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)([^@\s/]+)(@)"), rf"\1{MASK}\3"),
)

# Shorter configured secrets are not redacted as plain text: masking every "abc" would
# wreck every line, and a 3-character secret is no secret. (The patterns still apply.)
_MIN_SECRET_LEN = 4


class Redactor:
    """Replaces secrets in text: the configured values first, then generic token shapes."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)
        self._secrets = tuple(values)
        self._literal = re.compile("|".join(re.escape(s) for s in values)) if values else None

    @property
    def secrets(self) -> tuple[str, ...]:
        return self._secrets

    def redact(self, text: str) -> str:
        if self._literal is not None:
            text = self._literal.sub(MASK, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


_ACTIVE = Redactor()


def redact(text: str) -> str:
    """Redact `text` with the secrets `setup_logging` was given (for output outside logging,
    e.g. `parley check` printing an error that quotes a URL)."""
    return _ACTIVE.redact(text)


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_OWN_ATTRS = frozenset(CONTEXT_FIELDS) | {"_parley_redacted"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and k not in _OWN_ATTRS}


class RedactingFilter(logging.Filter):
    """Rewrites a record in place so no handler after it can see a secret.

    The message is rendered (`msg % args`) and redacted, `args` cleared; the traceback is
    rendered into `exc_text` and redacted (formatters reuse `exc_text`), and so are the
    stack info and string `extra=` fields. A record is processed once, however many
    handlers carry this filter.
    """

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self._redactor = redactor

    @property
    def redactor(self) -> Redactor:
        return self._redactor if self._redactor is not None else _ACTIVE

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_parley_redacted", False):
            return True
        r = self.redactor
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not leak its args verbatim
            message = f"{record.msg!r} (unformattable args: {record.args!r})"
        record.msg = r.redact(message)
        record.args = ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = r.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = r.redact(record.stack_info)
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, r.redact(value))
            elif isinstance(value, (dict, list, tuple)):
                setattr(record, key, r.redact(json.dumps(value, default=str, ensure_ascii=False)))
        record._parley_redacted = True
        return True


# --------------------------------------------------------------------------- formatters


CONTINUATION = "  | "
"""Starts every line of a text record after its first (message lines, traceback lines)."""


def _lines(text: str) -> list[str]:
    """Physical lines of `text`; a bare CR is shown as `\\r` (it would overwrite the line on a terminal)."""
    return text.replace("\r\n", "\n").replace("\r", "\\r").split("\n")


def _escaped(text: str) -> str:
    return "\\n".join(_lines(text))


class TextFormatter(logging.Formatter):
    """`2025-01-31 12:00:00.123 INFO  bots.gateway [telegram chat=123 turn=45] message key=value`.

    A record that has more to say -- a multi-line message, a traceback, a stack -- goes on
    over *continuation lines*, each starting with `  | `:

        2025-01-31 12:00:00.123 ERROR   bots.gateway [telegram chat=123 turn=45] turn failed unexpectedly
          | Traceback (most recent call last):
          |   File "/app/bots/gateway.py", line 612, in _answer_message
          | RuntimeError: went wrong

    A record starts with its timestamp in the first column and nothing else does, so a
    person reads a traceback as Python printed it, and a log shipper joins the lines by
    the usual rule (a line that starts with whitespace continues the previous one:
    Fluent Bit, Vector, Loki, Logstash). Text from outside (a user's message quoted in a
    log line) cannot forge a record: its line breaks become continuation lines too.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
        parts = [f"{stamp}.{int(record.msecs):03d}", f"{record.levelname:<7}", record.name]
        context = _context_label(record)
        if context:
            parts.append(context)
        first, *more = _lines(record.getMessage())
        parts.append(first)
        for key, value in _extras(record).items():
            parts.append(f"{key}={_escaped(str(value))}")  # a field stays one `key=value`
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            more.extend(_lines(record.exc_text.rstrip("\n")))
        if record.stack_info:
            more.extend(_lines(record.stack_info.rstrip("\n")))
        return "\n".join([" ".join(parts), *((CONTINUATION + line).rstrip(" ") for line in more)])


def _context_label(record: logging.LogRecord) -> str:
    platform = getattr(record, "platform", None)
    chat = getattr(record, "chat", None)
    turn = getattr(record, "turn", None)
    replica = getattr(record, "replica", None)
    bits = [f"replica={replica}"] if replica else []
    if platform:
        bits.append(str(platform))
    if chat is not None:
        bits.append(f"chat={chat}")
    if turn is not None:
        bits.append(f"turn={turn}")
    return f"[{' '.join(bits)}]" if bits else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, platform/chat/turn when bound,
    any `extra=` fields, and for an exception `exc` (the whole traceback, one string with
    its line breaks) and `exc_type` (the exception's class, to filter on)."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, tz=timezone.utc)
        entry: dict[str, Any] = {
            "ts": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        for key, value in _extras(record).items():
            entry.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
            if record.exc_info and record.exc_info[0] is not None:
                entry["exc_type"] = record.exc_info[0].__name__
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


# --------------------------------------------------------------------------- setup

_HANDLER_MARK = "_parley_handler"
_touched_levels: dict[str, int] = {}
_lent_filters: list[tuple[logging.Handler, logging.Filter]] = []


def setup_logging(
    level: str | int = "INFO",
    format: LogFormat = "text",  # noqa: A002 -- the CLI flag is --log-format
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    loggers: Mapping[str, str | int] | None = None,
) -> logging.Handler:
    """Install parley's one root handler (replacing a previous one) and return it.

    Safe to call again, e.g. once with no secrets before the config is read, then with
    `settings.secrets()` and `settings.logging`. `loggers` sets per-logger levels
    (`{"discord.gateway": "DEBUG"}`) on top of the defaults for `NOISY_LOGGERS`.
    The redaction filter is attached to *every* root handler, so a handler someone else
    added (or adds before this call) cannot print a secret either.
    """
    global _ACTIVE
    _ACTIVE = Redactor(secrets)
    root = logging.getLogger()
    _remove_own_handlers(root)
    _restore_levels()

    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(TurnContextFilter())
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    root.addHandler(handler)
    for other in root.handlers:
        for kind in (TurnContextFilter, RedactingFilter):
            if not any(isinstance(f, kind) for f in other.filters):
                added = kind()
                other.addFilter(added)
                _lent_filters.append((other, added))

    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root.setLevel(numeric)
    debug = numeric <= logging.DEBUG
    for name, (quiet, when_debug) in NOISY_LOGGERS.items():
        _set_level(name, when_debug if debug else quiet)
    for name, value in (loggers or {}).items():
        lvl = logging.getLevelName(value.upper()) if isinstance(value, str) else int(value)
        _set_level(name, lvl)
    return handler


def reset_logging() -> None:
    """Undo `setup_logging`: remove its handler and restore the library levels it changed."""
    global _ACTIVE
    _remove_own_handlers(logging.getLogger())
    _restore_levels()
    _ACTIVE = Redactor()


def _remove_own_handlers(root: logging.Logger) -> None:
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.flush()
    for handler, added in _lent_filters:
        handler.removeFilter(added)
    _lent_filters.clear()


def _set_level(name: str, level: int) -> None:
    logger = logging.getLogger(name)
    _touched_levels.setdefault(name, logger.level)
    logger.setLevel(level)


def _restore_levels() -> None:
    for name, level in _touched_levels.items():
        logging.getLogger(name).setLevel(level)
    _touched_levels.clear()
