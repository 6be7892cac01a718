"""Shared pytest setup: the fake servers' fixtures are registered as plugins."""

from __future__ import annotations

import importlib.util

_PLUGINS = (
    "tests.fakes.llm_fixtures",
    "tests.fakes.telegram_fixtures",
    "tests.fakes.discord_fixtures",
    "tests.store_fixtures",
)

# Until every fake exists, register the ones that do (removed once all have landed).
pytest_plugins = [name for name in _PLUGINS if importlib.util.find_spec(name) is not None]
