"""Wiring: from validated `Settings` to a running gateway, and back down again.

`run` starts every configured platform in one process and blocks until told to stop
(SIGTERM/SIGINT in the CLI). Shutdown is graceful and ordered: stop receiving (unread
Telegram updates stay on Telegram's side), let running turns finish up to
`shutdown_timeout`, stop the rest visibly (their live messages are finalized, marked
stopped), then close connections and the store.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from agent import Agent, ToolRegistry
from agent.tools import current_time, make_fetch_url
from bots.access import Access
from bots.config import Settings
from bots.gateway import ChatDefaults, Connector, Gateway
from bots.health import HealthServer
from bots.metrics import Metrics
from bots.store import Store

log = logging.getLogger(__name__)


def build_tools(settings: Settings) -> ToolRegistry:
    """The tools the agent may call: safe ones on by default, fetch_url only when enabled."""
    tools = settings.agent.tools
    registry = ToolRegistry()
    if tools.datetime:
        registry.add(current_time)
    fetch = tools.fetch_url
    if fetch.enabled:
        registry.add(make_fetch_url(max_bytes=fetch.max_bytes, timeout=fetch.timeout, allow_private=fetch.allow_private))
    return registry


def chat_defaults(settings: Settings) -> ChatDefaults:
    chat = settings.chat
    return ChatDefaults(
        model=settings.provider.model,
        models=tuple(settings.provider.models),
        system_prompt=settings.agent.system_prompt,
        busy_policy=chat.busy_policy,
        queue_max=chat.queue_max,
        streaming=chat.streaming,
        pre_tool_text=chat.pre_tool_text,
        show_reasoning=chat.show_reasoning,
        sessions_per_user_in_groups=chat.sessions_per_user_in_groups,
        group_trigger=settings.telegram.group_trigger,
        error_cooldown=chat.error_cooldown,
        history_max_messages=settings.agent.history.max_messages,
        history_max_tokens=settings.agent.history.max_tokens,
        prices={name: (p.prompt, p.completion) for name, p in settings.provider.prices.items()},
    )


@dataclass
class App:
    """Everything one parley process runs."""

    settings: Settings
    store: Store
    agent: Agent
    gateway: Gateway
    metrics: Metrics
    connectors: list[Connector] = field(default_factory=list)
    health: HealthServer | None = None

    @classmethod
    async def create(cls, settings: Settings, *, extra_owners: frozenset[str] = frozenset()) -> "App":
        metrics = Metrics()
        store = await Store.open(settings.store.get_secret_value())
        stale = await store.mark_stale_turns(status="error")
        if stale:
            log.info("marked %d turns left running by an earlier process as failed", stale)
        agent = Agent(settings.provider.agent_config(), tools=build_tools(settings), max_steps=settings.agent.max_steps)
        policy = settings.access.policy()
        if extra_owners:
            from dataclasses import replace

            policy = replace(policy, owners=policy.owners | extra_owners)
        gateway = Gateway(
            store=store, agent=agent, access=Access(store, policy), defaults=chat_defaults(settings), metrics=metrics
        )
        return cls(settings=settings, store=store, agent=agent, gateway=gateway, metrics=metrics)

    def platform_connectors(self) -> list[Connector]:
        """A connector for every platform section that has a token."""
        s = self.settings
        connectors: list[Connector] = []
        if s.telegram.enabled:
            from bots.telegram import TelegramConnector, WebhookOptions

            webhook = None
            if s.telegram.mode == "webhook":
                wh = s.telegram.webhook
                webhook = WebhookOptions(
                    url=str(wh.url),
                    listen=wh.listen.host,
                    port=wh.listen.port,
                    path=wh.path,
                    secret_token=wh.secret_token.get_secret_value() if wh.secret_token else None,
                )
            assert s.telegram.token is not None
            connectors.append(
                TelegramConnector(
                    s.telegram.token.get_secret_value(),
                    api_base=s.telegram.api_base,
                    webhook=webhook,
                    drafts=s.telegram.drafts,
                    pacing=s.telegram.pacing.policy(),
                    owners=frozenset(s.access.owners),
                )
            )
        if s.discord.enabled:
            from bots.discord import DiscordConnector

            assert s.discord.token is not None
            counter = self.metrics.rate_limited.labels("discord")
            connectors.append(
                DiscordConnector(
                    s.discord.token.get_secret_value(),
                    api_base=s.discord.api_base,
                    gateway_url=s.discord.gateway_url,
                    command_prefix=s.discord.command_prefix,
                    slash_commands=s.discord.slash_commands,
                    pacing=s.discord.pacing.policy(),
                    on_rate_limited=counter.inc,
                )
            )
        return connectors

    async def start(self, connectors: list[Connector]) -> None:
        if self.settings.metrics.listen is not None:
            listen = self.settings.metrics.listen
            self.health = HealthServer(self.metrics, ready=self.ready)
            await self.health.start(listen.host, listen.port)
        for connector in connectors:
            self.gateway.attach(connector)
            await connector.start(self.gateway)
            self.connectors.append(connector)

    async def ready(self) -> tuple[bool, dict[str, bool]]:
        """Readiness: every started platform connected and the store reachable."""
        checks = {c.platform: c.connected for c in self.connectors}
        checks["store"] = await self.store.ping()
        return all(checks.values()) and bool(self.connectors), checks

    async def stop(self) -> None:
        """Graceful shutdown, in order (see module docstring)."""
        for connector in self.connectors:
            try:
                await connector.stop_receiving()
            except Exception:
                log.exception("%s: error while stopping to receive", connector.platform)
        await self.gateway.shutdown(self.settings.shutdown_timeout)
        for connector in self.connectors:
            try:
                await connector.stop()
            except Exception:
                log.exception("%s: error while closing", connector.platform)
        if self.health is not None:
            await self.health.stop()
        await self.agent.aclose()
        await self.store.close()


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Start every configured platform, serve until `stop` is set, then shut down gracefully."""
    app = await App.create(settings)
    try:
        connectors = app.platform_connectors()
        if not connectors:
            log.warning("no platform has a token: set telegram.token and/or discord.token (nothing to serve)")
        await app.start(connectors)
        log.info("parley is running (%s)", ", ".join(c.platform for c in connectors) or "no platforms")
        await stop.wait()
        log.info("shutting down: finishing running turns (up to %ss)", settings.shutdown_timeout)
    finally:
        await app.stop()
    log.info("parley stopped")
