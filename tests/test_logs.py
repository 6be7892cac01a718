"""Logging: turn context on every record, tracebacks kept readable, and no secret ever written.

Text records start with a timestamp in the first column; a traceback or a multi-line
message continues over lines starting with `  | `. JSON records are one line each, with a
traceback as one field.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import telegram
from aiohttp import web

from bots.logs import redact, reset_logging, setup_logging, turn_context

TG_TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"  # Telegram's shape
PLAIN_SECRET = "correct-horse-battery-staple"  # no recognisable shape: only configuration can catch it

log = logging.getLogger("bots.test_logs")


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """A stream for parley's handler; the root logger is restored afterwards."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    yield stream
    reset_logging()
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --------------------------------------------------------------------------- context and format


async def test_json_lines_carry_platform_chat_and_turn_inside_turn_context(out: io.StringIO) -> None:
    setup_logging("INFO", "json", stream=out)
    log.info("before")
    with turn_context(platform="telegram", chat=123):
        with turn_context(turn=45):
            log.info("inside %s", "turn")

            async def in_a_task() -> None:
                log.warning("from a task")

            await asyncio.create_task(in_a_task())
        log.info("after the turn")
    log.info("after")

    records = [json.loads(line) for line in lines(out)]
    assert [r["msg"] for r in records] == ["before", "inside turn", "from a task", "after the turn", "after"]
    assert all(r["logger"] == "bots.test_logs" and r["ts"].endswith("Z") for r in records)
    context = [{k: r.get(k) for k in ("platform", "chat", "turn")} for r in records]
    assert context == [
        {"platform": None, "chat": None, "turn": None},
        {"platform": "telegram", "chat": "123", "turn": "45"},
        {"platform": "telegram", "chat": "123", "turn": "45"},
        {"platform": "telegram", "chat": "123", "turn": None},
        {"platform": None, "chat": None, "turn": None},
    ]


def test_a_replica_stamps_every_line_with_its_id(out: io.StringIO) -> None:
    from bots.logs import set_replica

    setup_logging("INFO", "text", stream=out)
    try:
        log.info("before the replica knows its id")
        set_replica("web-2")
        with turn_context(platform="telegram", chat=9):
            log.info("in a turn")
        setup_logging("INFO", "json", stream=out)
        log.info("as json")
    finally:
        set_replica(None)
    first, second, third = lines(out)
    assert "replica=" not in first
    assert "[replica=web-2 telegram chat=9] in a turn" in second
    assert json.loads(third)["replica"] == "web-2"


def test_json_lines_include_extra_fields_and_tracebacks(out: io.StringIO) -> None:
    setup_logging("INFO", "json", stream=out)
    try:
        raise ValueError("bad value")
    except ValueError:
        log.exception("turn failed", extra={"cause": "timeout", "step": 2})
    (record,) = [json.loads(line) for line in lines(out)]
    assert record["level"] == "ERROR" and record["cause"] == "timeout" and record["step"] == 2
    assert "ValueError: bad value" in record["exc"] and record["exc_type"] == "ValueError"


def test_text_records_start_with_a_timestamp_and_continue_over_indented_lines(out: io.StringIO) -> None:
    setup_logging("INFO", "text", stream=out)
    with turn_context(platform="telegram", chat=123, turn=45):
        log.info("first line\nsecond line")
        try:
            raise RuntimeError("went wrong")
        except RuntimeError:
            log.exception("turn failed")
    log.info("no context", extra={"cause": "idle"})

    text = lines(out)
    assert text[0].endswith(" INFO    bots.test_logs [telegram chat=123 turn=45] first line")
    assert text[1] == "  | second line"
    assert text[2].endswith(" ERROR   bots.test_logs [telegram chat=123 turn=45] turn failed")
    assert text[3] == "  | Traceback (most recent call last):"
    assert text[4].startswith('  |   File "') and "test_logs.py" in text[4]
    assert text[-2] == "  | RuntimeError: went wrong"
    assert text[-1].endswith(" INFO    bots.test_logs no context cause=idle")
    assert "\\n" not in out.getvalue()
    records = [line for line in text if not line.startswith("  | ")]
    assert len(records) == 3 and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ", r) for r in records)


def test_text_from_outside_cannot_forge_a_record(out: io.StringIO) -> None:
    setup_logging("INFO", "text", stream=out)
    log.info("user wrote %r", "hi\n2025-01-01 00:00:00.000 ERROR   bots.gateway owner removed")
    log.info("user wrote %s", "hi\r\n2025-01-01 00:00:00.000 ERROR   bots.gateway owner removed\rover")
    first, second = [line for line in lines(out) if not line.startswith("  | ")]
    assert first.endswith("user wrote 'hi\\n2025-01-01 00:00:00.000 ERROR   bots.gateway owner removed'")  # repr: one line
    assert second.endswith("user wrote hi")
    assert lines(out)[-1] == "  | 2025-01-01 00:00:00.000 ERROR   bots.gateway owner removed\\rover"


async def test_a_library_errors_traceback_is_multi_line_in_text_and_one_field_in_json(out: io.StringIO) -> None:
    """aiohttp refusing a connection to a closed port on 127.0.0.1: the chained traceback
    as Python prints it (text) or as one JSON field -- secrets redacted in both."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def fail() -> None:
        try:
            async with aiohttp.ClientSession() as session:
                await session.get(f"http://127.0.0.1:{port}/v1/models")
        except aiohttp.ClientConnectorError as exc:
            raise RuntimeError(f"provider unreachable with key {PLAIN_SECRET}") from exc

    for fmt in ("text", "json"):
        out.seek(0)
        out.truncate()
        setup_logging("INFO", fmt, stream=out, secrets=[PLAIN_SECRET])
        try:
            await fail()
        except RuntimeError:
            log.exception("probe failed")
        written = out.getvalue()
        assert PLAIN_SECRET not in written
        if fmt == "text":
            header, *more = lines(out)
            assert header.endswith(" ERROR   bots.test_logs probe failed")
            assert more and all(line.startswith("  |") for line in more)
            body = [line.removeprefix("  | ").removeprefix("  |") for line in more]
            assert "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', %d)" % port in body
            assert any(line.startswith("aiohttp.client_exceptions.ClientConnectorError: Cannot connect to host")
                       for line in body)
            assert "The above exception was the direct cause of the following exception:" in body
            assert body[-1] == "RuntimeError: provider unreachable with key ***"
            assert "\\n" not in written
        else:
            (line,) = written.splitlines()
            record = json.loads(line)
            assert record["msg"] == "probe failed" and record["exc_type"] == "RuntimeError"
            exc = record["exc"]
            assert exc.startswith("Traceback (most recent call last):\n")
            assert "\nConnectionRefusedError: [Errno 111]" in exc
            assert exc.endswith("\nRuntimeError: provider unreachable with key ***")


# --------------------------------------------------------------------------- redaction


def test_configured_secret_passed_as_an_argument_is_redacted(out: io.StringIO) -> None:
    setup_logging("INFO", stream=out, secrets=[PLAIN_SECRET])
    log.info("connecting with %s and %r", PLAIN_SECRET, {"key": PLAIN_SECRET})
    assert PLAIN_SECRET not in out.getvalue()
    assert lines(out)[0].endswith("connecting with *** and {'key': '***'}")


def test_secret_inside_exception_text_is_redacted(out: io.StringIO) -> None:
    setup_logging("INFO", "json", stream=out, secrets=[PLAIN_SECRET])
    try:
        try:
            raise ConnectionError(f"refused for key {PLAIN_SECRET}")
        except ConnectionError as inner:
            raise RuntimeError(f"login failed at https://api.telegram.org/bot{TG_TOKEN}/getMe") from inner
    except RuntimeError:
        log.exception("platform failed")
    (record,) = [json.loads(line) for line in lines(out)]
    assert PLAIN_SECRET not in out.getvalue() and TG_TOKEN not in out.getvalue()
    assert "ConnectionError: refused for key ***" in record["exc"]
    assert "RuntimeError: login failed at https://api.telegram.org/bot***/getMe" in record["exc"]


def test_secret_in_extra_fields_is_redacted(out: io.StringIO) -> None:
    setup_logging("INFO", "json", stream=out, secrets=[PLAIN_SECRET])
    log.info("payload", extra={"body": {"auth": PLAIN_SECRET}, "note": PLAIN_SECRET})
    assert PLAIN_SECRET not in out.getvalue()
    (record,) = [json.loads(line) for line in lines(out)]
    assert record["note"] == "***" and "***" in record["body"]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        pytest.param(
            f"POST https://api.telegram.org/bot{TG_TOKEN}/getMe",
            "POST https://api.telegram.org/bot***/getMe",
            id="telegram-url",
        ),
        pytest.param(
            "Authorization: Bot MTA0NDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuv",
            "Authorization: Bot ***",
            id="discord-authorization",
        ),
        pytest.param("Authorization: Bearer sk-proj-abcdefghijklmnop0123", "Authorization: Bearer ***", id="bearer"),
        pytest.param("using key sk-proj-abcdefghijklmnop0123 now", "using key *** now", id="sk-key"),
        pytest.param(
            'sent {"op":2,"d":{"token":"MTA0NDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuv","intents":513}}',
            'sent {"op":2,"d":{"token":"***","intents":513}}',
            id="discord-identify",
        ),
        pytest.param(
            "setWebhook url=https://x.example/tg&secret_token=abcDEF123456",
            "setWebhook url=https://x.example/tg&secret_token=***",
            id="form-secret",
        ),
        pytest.param(
            "store postgresql://parley:pa55word@db/parley", "store postgresql://parley:***@db/parley", id="url-password"
        ),
        pytest.param(
            "usage prompt_tokens=1234567890 max_tokens: 4096",
            "usage prompt_tokens=1234567890 max_tokens: 4096",
            id="counts-stay",
        ),
    ],
)
def test_token_shapes_are_redacted_without_configuration(out: io.StringIO, message: str, expected: str) -> None:
    setup_logging("INFO", stream=out)
    log.info("%s", message)
    assert lines(out)[0].endswith(" " + expected)
    assert redact(message) == expected  # the same rules for text printed outside logging


def test_other_root_handlers_are_redacted_too(out: io.StringIO) -> None:
    foreign_stream = io.StringIO()
    foreign = logging.StreamHandler(foreign_stream)
    root = logging.getLogger()
    root.addHandler(foreign)
    try:
        setup_logging("INFO", stream=out, secrets=[PLAIN_SECRET])
        with turn_context(platform="discord"):
            log.info("secret %s", PLAIN_SECRET)
    finally:
        root.removeHandler(foreign)
    assert foreign_stream.getvalue() == "secret ***\n"
    assert PLAIN_SECRET not in out.getvalue()


def test_setup_is_repeatable_and_reset_restores_library_levels(out: io.StringIO) -> None:
    root = logging.getLogger()
    httpx_level = logging.getLogger("httpx").level
    setup_logging("INFO", stream=out)
    setup_logging("INFO", stream=out, secrets=[PLAIN_SECRET], loggers={"discord.gateway": "DEBUG"})
    own = [h for h in root.handlers if getattr(h, "_parley_handler", False)]
    assert len(own) == 1
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger("discord.gateway").level == logging.DEBUG
    reset_logging()
    assert not [h for h in root.handlers if getattr(h, "_parley_handler", False)]
    assert logging.getLogger("httpx").level == httpx_level
    assert logging.getLogger("discord.gateway").level == logging.NOTSET


# --------------------------------------------------------------------------- real libraries


@pytest.fixture
async def bot_api() -> AsyncIterator[str]:
    """A minimal Bot API on 127.0.0.1 answering getMe: enough for PTB's real HTTP path."""

    async def method(request: web.Request) -> web.Response:
        me = {"id": 123456789, "is_bot": True, "first_name": "fake", "username": "fakebot"}
        return web.json_response({"ok": True, "result": me})

    app = web.Application()
    app.router.add_route("*", "/bot{token}/{method}", method)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("token", "secrets"),
    [
        pytest.param(TG_TOKEN, [], id="token-shape"),
        pytest.param("opaque-" + PLAIN_SECRET, ["opaque-" + PLAIN_SECRET], id="configured-secret"),
    ],
)
async def test_ptb_request_urls_logged_by_httpx_are_redacted(
    out: io.StringIO, bot_api: str, token: str, secrets: list[str]
) -> None:
    setup_logging("DEBUG", stream=out, secrets=secrets)
    bot = telegram.Bot(token, base_url=f"{bot_api}/bot")
    async with bot:
        me = await bot.get_me()
    assert me.username == "fakebot"

    text = out.getvalue()
    assert token not in text
    assert f'HTTP Request: POST {bot_api}/bot***/getMe "HTTP/1.1 200 OK"' in text  # httpx's own line
    assert "POST /bot***/getMe" in text  # the server's access log line, too


async def test_httpx_request_lines_are_quiet_at_info(out: io.StringIO, bot_api: str) -> None:
    setup_logging("INFO", stream=out)
    async with telegram.Bot(TG_TOKEN, base_url=f"{bot_api}/bot") as bot:
        await bot.get_me()
    assert "HTTP Request" not in out.getvalue()

    setup_logging("INFO", stream=out, loggers={"httpx": "INFO"})  # an operator may turn them back on
    async with telegram.Bot(TG_TOKEN, base_url=f"{bot_api}/bot") as bot:
        await bot.get_me()
    assert "HTTP Request: POST" in out.getvalue() and TG_TOKEN not in out.getvalue()
