"""A whole `parley run` at DEBUG: no secret in its output, and every turn line has its context.

One run per log format goes through start-up (Telegram in webhook mode, so the webhook
secret is actually sent), a turn on Telegram, a turn on Discord, a turn whose provider
fails (stream dropped, fallback answered 500) and a SIGTERM shutdown. Then the child's
stdout and stderr are searched for every secret it was given. The secrets have shapes
the generic patterns do not all recognise (the provider key is no `sk-` key), so only
the configured-secret redaction can keep them out.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fast_telegram_limits
from tests.fakes.discord import DiscordLimits
from tests.fakes.llm import FakeLLM, Reply
from tests.support.stack import OWNER_DC, OWNER_TG, parley_config
from tests.support.process import ParleyProcess, write_config

TG_TOKEN = "7357913579:AAHk3Lq9ZxWvUt8RsQpOn7MlKj6IhGf5EdC"
TG_SECRET_PART = TG_TOKEN.partition(":")[2]
DC_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4OQ.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456789AB"
API_KEY = "prov-Secret-4f9a8b7c6d5e3a2b"  # no recognisable shape
WEBHOOK_SECRET = "whsec_Q2xvdWRzQXJlTmljZQ"
SECRETS = {
    "telegram token": TG_TOKEN,
    "telegram token's secret part": TG_SECRET_PART,
    "discord token": DC_TOKEN,
    "provider api key": API_KEY,
    "webhook secret": WEBHOOK_SECRET,
}

TEXT_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (?P<level>[A-Z]+) +(?P<logger>\S+) "
    r"(?:\[(?P<platform>\w+) chat=(?P<chat>\S+) turn=(?P<turn>\d+)\] )?(?P<msg>.*)$"
)


def free_port() -> int:
    """A port for PTB's webhook server: its URL must be known before it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(line: str, fmt: str) -> dict[str, Any]:
    """One log record (a JSON line, or a text record's first line) as {logger, msg, platform, chat, turn}."""
    if fmt == "json":
        record = json.loads(line)
        assert isinstance(record, dict) and {"ts", "level", "logger", "msg"} <= record.keys(), line
        return record
    match = TEXT_LINE.match(line)
    assert match is not None, f"not a parley text log line: {line!r}"
    return {k: v for k, v in match.groupdict().items() if v is not None}


def records_of(lines: list[str], fmt: str) -> list[dict[str, Any]]:
    """Every record of a log; in text, lines starting with `  |` continue the record before them."""
    if fmt == "json":
        return [parse(line, fmt) for line in lines]
    records: list[dict[str, Any]] = []
    for line in lines:
        if line.startswith("  |"):
            assert records, f"a continuation line with no record before it: {line!r}"
            records[-1].setdefault("more", []).append(line)
        else:
            records.append(parse(line, fmt))
    return records


def about_a_turn(record: dict[str, Any]) -> bool:
    """Lines that report on a turn: the agent's, the live reply's, and the gateway's turn lines.

    Not `agent.tokens`: which way a model's token estimates are counted is a fact of the
    process, told once per model (at start, or from the thread that loads a tokenizer).
    """
    logger, msg = record["logger"], record["msg"]
    return (
        (logger.startswith("agent") and logger != "agent.tokens")
        or logger == "bots.live_reply"
        or (logger == "bots.gateway" and re.match(r"turn\b", msg) is not None)
    )


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_full_run_never_logs_a_secret_and_turn_lines_carry_context(
    fmt: str, tmp_path: Path, make_fake_telegram, make_fake_discord
) -> None:
    telegram = await make_fake_telegram(token=TG_TOKEN, limits=fast_telegram_limits())
    discord = await make_fake_discord(
        token=DC_TOKEN, limits=DiscordLimits(channel_messages=100, channel_window=1.0, global_rate=500.0)
    )
    async with FakeLLM(api_key=API_KEY) as llm:
        port = free_port()
        config = parley_config(tmp_path, llm, telegram=telegram, discord=discord, overrides={
            "telegram": {"mode": "webhook", "webhook": {
                "url": f"http://127.0.0.1:{port}/telegram", "listen": f"127.0.0.1:{port}",
                "secret_token": WEBHOOK_SECRET,
            }},
        })
        path = write_config(tmp_path, config)
        args = ["run", "--config", str(path), "--log-level", "DEBUG", "--log-format", fmt]
        async with await ParleyProcess.start(args, cwd=tmp_path) as proc:
            await proc.wait_for_line("parley is running", timeout=30)

            tg_owner = telegram.user(OWNER_TG, "Owner")
            chat = telegram.private_chat(tg_owner)
            llm.script(Reply.text("Hello from Telegram.", chunk=4))
            telegram.user_says(chat, tg_owner, "hi")
            await telegram.wait_for(lambda: telegram.bot_texts(chat.id) == ["Hello from Telegram."], timeout=15)

            dc_owner = discord.user(OWNER_DC, "owner")
            channel = discord.dm_channel(dc_owner)
            llm.script(Reply.text("Hello from Discord.", chunk=4))
            discord.user_says(channel, dc_owner, "hi")
            await discord.wait_for(lambda: discord.bot_texts(channel) == ["Hello from Discord."], timeout=15)

            llm.script(Reply.text("Partial answer that never finishes", chunk=8, fault="abort_midstream+nonstream_500"))
            telegram.user_says(chat, tg_owner, "and now?")
            # The provider answered the fallback with HTTP 500: the line says so, and where.
            failed = await proc.wait_for_line("turn failed: ProviderServerError")
            await telegram.wait_for(lambda: any("⚠️" in t for t in telegram.bot_texts(chat.id)), timeout=15)

            proc.signal(signal.SIGTERM)
            assert await proc.wait_exit(30) == 0

    output = "\n".join(proc.stdout + proc.stderr)
    for what, secret in SECRETS.items():
        assert secret not in output, f"the {what} appears in the output"
    # The secrets were there to leak: PTB logs every Bot API URL (token in the path) and
    # setWebhook's parameters (the secret token) at DEBUG -- redacted.
    assert "/bot***/getMe" in output and "'secret_token': '***'" in output

    records = records_of(proc.stderr, fmt)
    host = llm.base_url.split("//")[1].split("/")[0]
    (failed_record,) = [r for r in records if r["msg"].startswith("turn failed")]
    assert failed_record["msg"].startswith(
        "turn failed: ProviderServerError: provider returned HTTP 500: The server had an error"
    ), failed
    if fmt == "json":
        assert (failed_record["provider"], failed_record["model"], failed_record["status"]) == (host, "fake-model", 500)
    else:
        assert failed.endswith(f" provider={host} model=fake-model status=500"), failed
    # At DEBUG the traceback of the SDK's error follows: multi-line in text, one field in JSON.
    (chain,) = [r for r in records if r["msg"].startswith("the failed turn's provider error")]
    trace = chain["exc"] if fmt == "json" else "\n".join(line[4:] for line in chain["more"])
    assert trace.startswith("Traceback (most recent call last):\n") and "openai.InternalServerError: Error code: 500" in trace
    assert proc.stdout == [], "`parley run` writes its log to stderr only"
    turn_records = [r for r in records if about_a_turn(r)]
    missing = [r for r in turn_records if not (r.get("platform") and r.get("chat") and r.get("turn"))]
    assert missing == [], f"turn lines without platform/chat/turn: {missing[:5]}"
    context = {(r["platform"], r["chat"], str(r["turn"])) for r in turn_records}
    assert context == {
        ("telegram", f"telegram:{chat.id}", "1"),
        ("discord", f"discord:{channel.id}", "2"),
        ("telegram", f"telegram:{chat.id}", "3"),
    }
    assert any(r["logger"].startswith("agent") for r in turn_records), "the fallback was not logged by the agent"
    # Library lines logged during a turn are attributed to it as well.
    assert any(r["logger"].startswith("telegram") and r.get("turn") == "1" for r in records)


def test_the_telegram_tokens_secret_part_is_redacted_on_its_own(tmp_path: Path) -> None:
    """The bot id before the colon is public; the part after it is the credential."""
    import io
    import logging

    from bots.config import load_config
    from bots.logs import reset_logging, setup_logging

    path = tmp_path / "parley.yaml"
    path.write_text(f"telegram: {{token: '{TG_TOKEN}'}}\nprovider: {{base_url: 'http://127.0.0.1:1/v1'}}\n")
    settings = load_config(path, env={}, env_file=None)
    assert TG_SECRET_PART in settings.secrets()
    stream = io.StringIO()
    root_level = logging.getLogger().level
    try:
        setup_logging("INFO", "text", secrets=settings.secrets(), stream=stream)
        logging.getLogger("bots.test").info("token tail %s, bot id %s", TG_SECRET_PART, TG_TOKEN.partition(":")[0])
    finally:
        reset_logging()
        logging.getLogger().setLevel(root_level)
    assert stream.getvalue().rstrip().endswith("token tail ***, bot id 7357913579")
