"""The whole of parley, wired from a real config file, against the fake servers.

`start_parley(...)` writes a parley.yaml pointing at the fake provider and the fake
platforms, loads it with the real config loader, and starts the real App with the real
connectors -- the same path `parley run` takes, minus the process boundary.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bots.app import App
from bots.config import load_config
from tests.fakes.discord import FakeDiscord
from tests.fakes.llm import DEFAULT_MODEL, OTHER_MODEL, FakeLLM
from tests.fakes.telegram import FakeTelegram

OWNER_TG = 1
OWNER_DC = "9001"

# Fast budgets for tests that are about behaviour, not pacing (pair with fast_telegram_limits()).
FAST_PACING = {
    "private": {"rate": 20.0, "burst": 5},
    "group": {"rate": 20.0, "burst": 5},
    "global": {"rate": 200.0, "burst": 50},
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Parley:
    app: App
    config_path: Path

    @property
    def gateway(self):  # noqa: ANN201
        return self.app.gateway

    @property
    def store(self):  # noqa: ANN201
        return self.app.store

    async def stop(self) -> None:
        await self.app.stop()


def parley_config(
    tmp_path: Path,
    llm: FakeLLM,
    *,
    telegram: FakeTelegram | None = None,
    discord: FakeDiscord | None = None,
    fast: bool = True,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "provider": {
            "base_url": llm.base_url,
            "api_key": llm.api_key,
            "model": DEFAULT_MODEL,
            "models": [OTHER_MODEL],
            "timeouts": {"connect": 5, "first_token": 10, "idle": 10, "total": 60},
            "max_retries": 0,
        },
        "store": f"sqlite:///{tmp_path / 'parley.db'}",
        "access": {"owners": [f"telegram:{OWNER_TG}", f"discord:{OWNER_DC}"]},
        "shutdown_timeout": 5,
    }
    if telegram is not None:
        config["telegram"] = {"token": telegram.token, "api_base": telegram.url}
        if fast:
            config["telegram"]["pacing"] = FAST_PACING
    if discord is not None:
        config["discord"] = {"token": discord.token, "api_base": discord.api_base, "gateway_url": discord.gateway_url}
        if fast:
            config["discord"]["pacing"] = FAST_PACING
    if overrides and "providers" in overrides:
        del config["provider"]  # the long form replaces the short one
    return deep_merge(config, overrides or {})


async def start_parley(
    tmp_path: Path,
    llm: FakeLLM,
    *,
    telegram: FakeTelegram | None = None,
    discord: FakeDiscord | None = None,
    fast: bool = True,
    overrides: dict[str, Any] | None = None,
) -> Parley:
    config = parley_config(tmp_path, llm, telegram=telegram, discord=discord, fast=fast, overrides=overrides)
    path = tmp_path / "parley.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_config(path, env={}, env_file=None)
    app = await App.create(settings)
    try:
        await app.start(app.platform_connectors())
    except BaseException:
        await app.stop()
        raise
    return Parley(app, path)
