"""Shared pytest setup: the fake servers' fixtures, and parley started against them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = [
    "tests.fakes.llm_fixtures",
    "tests.fakes.telegram_fixtures",
    "tests.fakes.discord_fixtures",
    "tests.store_fixtures",
    "tests.redis_fixtures",
]


def no_downloads(name: str) -> Any:
    """The tokenizer loader of tests: nothing is read from tiktoken's cache or the internet."""
    raise RuntimeError(f"tests load no tokenizer ({name}); tests/test_tokens.py injects its own")


@pytest.fixture(autouse=True)
def offline_tokenizers() -> Iterator[None]:
    """Every test starts with a fresh process `Tokenizers` that never downloads, so token
    estimates are characters / 4 (as every test expects) on any machine, online or not,
    whatever a developer's tiktoken cache holds; a test wanting a tokenizer installs one."""
    from agent.tokens import Tokenizers, use_tokenizers

    previous = use_tokenizers(Tokenizers(loader=no_downloads))
    try:
        yield
    finally:
        use_tokenizers(previous)


def fast_telegram_limits() -> Any:
    """Generous flood limits for tests about behaviour rather than pacing."""
    from tests.fakes.telegram import TelegramLimits

    return TelegramLimits(per_chat_rate=50.0, per_chat_burst=20, group_per_minute=3000, global_rate=500.0, global_burst=200)


@pytest.fixture
async def fast_telegram(make_fake_telegram: Callable[..., Awaitable[Any]]) -> Any:
    """A fake Telegram with generous limits (pair with parley's FAST_PACING)."""
    return await make_fake_telegram(limits=fast_telegram_limits())


@pytest.fixture
async def fast_discord(make_fake_discord: Callable[..., Awaitable[Any]]) -> Any:
    from tests.fakes.discord import DiscordLimits

    return await make_fake_discord(limits=DiscordLimits(channel_messages=100, channel_window=1.0, global_rate=500.0))


@pytest.fixture
async def parley(tmp_path: Path, fake_llm: Any) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """`await parley(telegram=fake, discord=fake, overrides={...})` starts parley; stopped after the test."""
    from tests.support.stack import start_parley

    started: list[Any] = []

    async def start(**kwargs: Any) -> Any:
        p = await start_parley(tmp_path, fake_llm, **kwargs)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in reversed(started):
            await p.stop()
