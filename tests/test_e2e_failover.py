"""Several providers end to end, from parley.yaml: two fake providers, the real openai SDK
and the real python-telegram-bot connector against the fake Telegram."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.fakes.llm import FakeLLM, Reply
from tests.support.conversations import start

USER_ID = 61


@pytest.fixture
async def backup_llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM(listed_models=("backup-model",)) as fake:
        yield fake


def providers(primary: FakeLLM, backup: FakeLLM, **extra: object) -> dict[str, object]:
    fast = {"connect": 2, "first_token": 5, "idle": 5, "total": 30}
    return {
        "providers": {
            "main": {"base_url": primary.base_url, "api_key": primary.api_key, "max_retries": 0, "timeouts": fast},
            "spare": {"base_url": backup.base_url, "api_key": backup.api_key, "max_retries": 0, "timeouts": fast},
        },
        "models": [
            {"name": "fake-model", "provider": "main", "display_name": "Main"},
            {"name": "backup", "provider": "spare", "id": "backup-model", "display_name": "Backup"},
        ],
        "fallback": ["backup"],
        **extra,
    }


async def test_primary_down_the_second_answers_with_a_note_and_usage_is_booked_to_it(
    fast_telegram, fake_llm, backup_llm, parley
) -> None:
    s = await start(parley, fast_telegram, fake_llm, **providers(fake_llm, backup_llm))
    await s.store.set_role(f"telegram:{USER_ID}", "user")
    user = s.user(USER_ID)
    chat = s.private(user)
    fake_llm.outage = 503
    backup_llm.script(Reply.text("Backup speaking.", usage={"prompt_tokens": 7, "completion_tokens": 3}))
    reply = await s.turn(chat, user, "hello?")
    assert reply == "Backup speaking.\n\n↪️ Answered by Backup: Main is unavailable right now."
    assert len(fake_llm.requests) == 1 and backup_llm.requests[-1].model == "backup-model"
    rows = await s.store.usage(since=datetime.now(UTC) - timedelta(hours=1), user_key=f"telegram:{USER_ID}")
    assert [(r.model, r.prompt, r.completion) for r in rows] == [("backup-model", 7, 3)]
    metrics = s.p.app.metrics.exposition().decode()
    assert 'parley_model_failovers_total{from_model="fake-model",to_model="backup"} 1.0' in metrics


async def test_a_bad_request_is_not_sent_to_another_model(fast_telegram, fake_llm, backup_llm, parley) -> None:
    s = await start(parley, fast_telegram, fake_llm, **providers(fake_llm, backup_llm))
    fake_llm.outage = 400
    reply = await s.turn(s.owner_chat(), s.owner, "hello?")
    assert reply.startswith("⚠️") and "Traceback" not in reply
    assert backup_llm.requests == []


async def test_breaker_opens_and_shows_in_status_and_metrics(fast_telegram, fake_llm, backup_llm, parley) -> None:
    # (It closing again after the cooldown, on a successful probe: tests/test_agent_failover.py, with a fake clock.)
    s = await start(parley, fast_telegram, fake_llm, **providers(fake_llm, backup_llm, breaker_failures=2,
                                                                 breaker_cooldown=300))
    chat = s.owner_chat()
    fake_llm.outage = 500
    for _ in range(2):
        await s.turn(chat, s.owner, "hi")
    asked = len(fake_llm.requests)
    backup_llm.script(Reply.text("Straight from the backup."))
    s.say(chat, s.owner, "hi")
    await backup_llm.wait_for(lambda: len(backup_llm.requests) == 3, timeout=10)
    await s.settle(chat)
    assert s.bot_texts(chat)[-1].startswith("Straight from the backup.\n\n↪️ Answered by Backup")
    assert len(fake_llm.requests) == asked  # skipped while the breaker is open
    status = await s.ask(chat, s.owner, "/status")
    assert re.search(r"^  fake-model: skipped after 2 failures in a row; tried again in (4m 5\ds|5m 0s)$", status, re.M)
    assert "Providers: main (127.0.0.1), spare (127.0.0.1)" in status
    assert 'parley_model_breaker_open{model="fake-model"} 1.0' in s.p.app.metrics.exposition().decode()
