"""Wiring: from validated `Settings` to a running gateway, and back down again.

`run` starts every configured platform in one process and blocks until told to stop
(SIGTERM/SIGINT in the CLI). Shutdown is graceful and ordered: stop receiving (unread
Telegram updates stay on Telegram's side), let running turns finish up to
`shutdown_timeout`, stop the rest visibly (their live messages are finalized, marked
stopped), then close connections and the store. From the first moment of shutdown
`/readyz` answers 503; `hurry` (a second signal) skips the wait for running turns.
A platform that reports a fatal error (`PlatformHealth.fatal`: a revoked token) takes the
same path, then `run` raises `PlatformFailed`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import Agent, ToolRegistry
from agent.errors import AgentError
from agent.tokens import tokenizers
from agent.errors import ToolError
from agent.tools import current_time, make_fetch_url
from agent.tools.mcp import McpServers
from agent.tools.plugins import entry_point_tools, module_tools
from bots.access import Access
from bots.config import Listen, Settings
from bots.errors import ParleyError, PlatformFailed
from bots.inbound import GroupTrigger
from bots.gateway import ChatDefaults, Connector, Gateway
from bots.health import Check, HealthServer, PlatformHealth, first_fatal
from bots.inbound_rate import InboundRate
from bots.metrics import Metrics
from bots.store import Store
from bots.tool_policy import ToolPolicy, ToolRuleSpec

if TYPE_CHECKING:
    from bots.cluster.replica import Replica

log = logging.getLogger(__name__)


def build_tools(settings: Settings) -> ToolRegistry:
    """The tools the agent may call: safe built-ins (fetch_url only when enabled), the
    config's modules and installed packages' entry points. MCP servers add theirs once
    they are up (`mcp_servers`). Raises `StartupFailed` for a module that cannot be
    loaded, or two tools with one name."""
    tools = settings.tools
    registry = ToolRegistry()
    if tools.datetime:
        registry.add(current_time)
    fetch = tools.fetch_url
    if fetch.enabled:
        registry.add(make_fetch_url(max_bytes=fetch.max_bytes, timeout=fetch.timeout, allow_private=fetch.allow_private))
    search = [Path.cwd()]
    if settings.config_file is not None:
        search.append(settings.config_file.parent)
    try:
        extra = module_tools(tools.modules, search=search)
        if tools.entry_points:
            extra += entry_point_tools()
        for item in extra:
            registry.add(item)
    except ToolError as exc:
        raise StartupFailed(f"tools: {describe_error(exc)}") from exc
    return registry


def tool_policy(settings: Settings) -> ToolPolicy:
    return ToolPolicy(
        {key: ToolRuleSpec(allow=rule.allow, approval=rule.approval) for key, rule in settings.tools.policy.items()}
    )


def mcp_servers(settings: Settings, registry: ToolRegistry) -> McpServers | None:
    """The configured MCP servers (enabled ones), adding their tools to `registry` once up."""
    configs = [server.server_config() for server in settings.tools.mcp_servers if server.enabled]
    return McpServers(configs, registry) if configs else None


def chat_defaults(settings: Settings) -> ChatDefaults:
    chat = settings.chat
    return ChatDefaults(
        model=settings.model_names()[0],
        models=tuple(settings.model_names()[1:]),
        system_prompt=settings.agent.system_prompt,
        busy_policy=chat.busy_policy,
        queue_max=chat.queue_max,
        streaming=chat.streaming,
        pre_tool_text=chat.pre_tool_text,
        show_reasoning=chat.show_reasoning,
        sessions_per_user_in_groups=chat.sessions_per_user_in_groups,
        error_cooldown=chat.error_cooldown,
        max_redelivery_age=chat.max_redelivery_age,
        max_attempts=chat.max_attempts,
        group_control=chat.group_control,
        reserve_completion_tokens=chat.reserve_completion_tokens,
        budget_hold_ttl=chat.budget_hold_ttl,
        still_working_after=chat.still_working_after,
        coalesce_window=chat.coalesce_window.windows(),
        history_max_messages=settings.agent.history.max_messages,
        history_max_tokens=settings.agent.history.max_tokens,
        prices=settings.prices(),
        model_choice=chat.model_choice,
        show_fallback_model=chat.show_fallback_model,
        model_roles={m.name: m.allow for m in settings.models if m.allow != "user"},
    )


class StartupFailed(ParleyError):
    """parley could not start serving: a platform refused to connect, a port was taken...

    The message says which part failed and why (secrets redacted); the CLI prints it and
    exits non-zero, so a supervisor (systemd, Docker) sees the failure and may retry.
    """


# After `shutdown_timeout`, running turns are interrupted; finalizing their live messages
# (one paced edit each) normally takes a moment. Past this, parley stops waiting for them.
FINALIZE_TIMEOUT = 15.0


def describe_error(exc: BaseException) -> str:
    """One line about an exception for operators: its type and text, secrets redacted."""
    from bots.logs import redact

    text = str(exc).strip()
    if isinstance(exc, (ParleyError, AgentError)):
        return redact(text or type(exc).__name__)
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


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
    mcp: McpServers | None = None
    replica: "Replica | None" = None  # cluster mode (`cluster.enabled`): this replica's part
    recover: bool = True
    stopping: bool = field(default=False, init=False)

    @classmethod
    async def create(
        cls, settings: Settings, *, extra_owners: frozenset[str] = frozenset(), recover: bool = True
    ) -> "App":
        """Open the store (migrating it) and build the agent and gateway; connects to no platform.

        `recover`: take over what an earlier process left unfinished -- turns it left
        "running", and the inbox messages it never finished (answered at `start`). Only the
        gateway process may: `parley chat` can share the store with a live `parley run`.
        """
        metrics = Metrics()
        store = await Store.open(settings.store.get_secret_value())
        try:
            # In a cluster, turns left running belong to conversations other replicas may
            # still be working on: each is marked when its conversation is taken over.
            if recover and not settings.cluster.enabled:
                stale = await store.mark_stale_turns(status="error")
                if stale:
                    log.info("%d turns were cut off by an earlier process (their messages are recovered at start)", stale)
            estimates = tokenizers()
            estimates.mode = settings.agent.tokenizer
            estimates.warm(*(spec.id for spec in settings.model_specs()))  # loads in the background, never waited for
            registry = build_tools(settings)
            agent = Agent(
                settings.catalogue(),
                tools=registry,
                max_steps=settings.agent.max_steps,
                on_request=metrics.count_provider_request,
                transcription=settings.media.transcription_config(settings.provider),
            )
        except BaseException:
            await store.close()
            raise
        policy = settings.access.policy()
        if extra_owners:
            from dataclasses import replace

            policy = replace(policy, owners=policy.owners | extra_owners)
        gateway = Gateway(
            store=store, agent=agent, access=Access(store, policy), defaults=chat_defaults(settings), metrics=metrics,
            inbound_rate=InboundRate(settings.access.user_rate) if settings.access.user_rate else None,
            media=settings.media.options(),
            tool_policy=tool_policy(settings),
            approval_timeout=settings.tools.approval_timeout,
        )
        metrics.watch_breakers(agent.breaker.snapshot)
        mcp = mcp_servers(settings, agent.tools)
        if mcp is not None:
            gateway.mcp_status = mcp.status
        replica = None
        if settings.cluster.enabled and recover:
            from bots.cluster.replica import Replica
            from bots.logs import set_replica

            replica = Replica(settings, store, gateway, metrics)
            set_replica(replica.id)
            try:
                await replica.open()
            except BaseException as exc:
                await store.close()
                await agent.aclose()
                if isinstance(exc, Exception):
                    raise StartupFailed(f"cluster: cannot open the job queue: {describe_error(exc)}") from exc
                raise
            gateway.cluster_status = replica.status
        return cls(
            settings=settings, store=store, agent=agent, gateway=gateway, metrics=metrics, recover=recover, mcp=mcp,
            replica=replica,
        )

    def platform_connectors(self) -> list[Connector]:
        """A connector for every platform section that has a token."""
        s = self.settings
        connectors: list[Connector] = []
        if s.telegram.enabled:
            from bots.telegram import DOWNLOAD_LIMIT, TelegramConnector, WebhookOptions

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
            telegram = TelegramConnector(
                s.telegram.token.get_secret_value(),
                api_base=s.telegram.api_base,
                webhook=webhook,
                drafts=s.telegram.drafts,
                pacing=s.telegram.pacing.policy(),
                owners=frozenset(s.access.owners),
                group_trigger=GroupTrigger(s.telegram.group_trigger, dict(s.telegram.group_triggers)),
                # Of the sizes Telegram offers for a photo, the largest that parley takes.
                max_photo_bytes=min(s.media.max_image_bytes, DOWNLOAD_LIMIT),
                shared_budgets=self.replica.budgets if self.replica is not None else None,
                cluster=self.replica.member() if self.replica is not None else None,
            )
            if self.replica is not None and webhook is None:
                self.replica.leaders["telegram_poller"] = telegram.poller  # one replica polls: which
            connectors.append(telegram)
        if s.discord.enabled:
            from bots.discord import DiscordConnector

            assert s.discord.token is not None
            # discord.py sleeps through most 429s inside its HTTP client, so they are
            # counted where they arrive (an aiohttp trace hook), not where they surface.
            self.metrics.count_429_at_transport("discord")
            connectors.append(
                DiscordConnector(
                    s.discord.token.get_secret_value(),
                    shared_budgets=self.replica.budgets if self.replica is not None else None,
                    api_base=s.discord.api_base,
                    gateway_url=s.discord.gateway_url,
                    command_prefix=s.discord.command_prefix,
                    slash_commands=s.discord.slash_commands,
                    pacing=s.discord.pacing.policy(),
                    on_rate_limited=self.metrics.rate_limited.labels("discord").inc,
                    max_ratelimit_timeout=s.discord.max_ratelimit_timeout,
                    group_trigger=GroupTrigger(s.discord.group_trigger, dict(s.discord.group_triggers)),
                )
            )
        return connectors

    async def start(self, connectors: list[Connector], *, serve_health: bool = True) -> None:
        """Serve health/metrics (if configured), then connect every platform, in order.

        Raises `StartupFailed` naming the part that failed; whatever had started stays
        registered, so `stop()` still closes it. `parley chat` passes `serve_health=False`:
        a terminal session must not take (or fight a running gateway for) the port.
        """
        listen = self.settings.metrics.listen
        if listen is not None and serve_health:
            health = HealthServer(self.metrics, ready=self.ready, details=self.details)
            try:
                await health.start(listen.host, listen.port)
            except OSError as exc:
                raise StartupFailed(f"metrics.listen {listen}: cannot listen: {describe_error(exc)}") from exc
            self.health = health
            where = Listen(listen.host, health.port)
            log.info("health and metrics on http://%s/metrics (also /healthz, /readyz)", where)
        if self.mcp is not None:
            await self.mcp.start()  # connects in the background: a slow server delays no chat
        if self.recover and self.replica is None:
            # What an earlier process left unfinished keeps its place before anything new.
            # (In a cluster, each conversation's job finds what was left of it.)
            await self.gateway.load_unfinished([c.platform for c in connectors])
        try:
            await self._connect(connectors)
            if self.replica is not None:
                await self.replica.start()  # conversations may run here from now on
        except BaseException:
            self.gateway.resume_unfinished(started=False)
            raise
        self.gateway.resume_unfinished()

    async def _connect(self, connectors: list[Connector]) -> None:
        for connector in connectors:
            self.gateway.attach(connector)
            try:
                await connector.start(self.gateway)
            except asyncio.CancelledError:
                await self._close_connector(connector)
                raise
            except Exception as exc:
                await self._close_connector(connector)
                raise StartupFailed(f"{connector.platform}: could not connect: {describe_error(exc)}") from exc
            self.connectors.append(connector)

    async def ready(self) -> tuple[bool, dict[str, Check]]:
        """Readiness: serving (not shutting down), every platform connected and working, the store reachable.

        A platform that keeps failing (retried, with back-off) counts as not ready once it
        has failed for `health.unready_after` seconds; its check then says why, e.g.
        `"telegram": "getUpdates failing for 42s (9 attempts): Bad Gateway"`.
        """
        unready_after = self.settings.health.unready_after
        checks: dict[str, Check] = {}
        for c in self.connectors:
            checks[c.platform] = c.health.problem(unready_after) or c.connected
        checks["store"] = await self.store.ping()
        checks["accepting"] = not self.stopping
        return all(v is True for v in checks.values()) and bool(self.connectors), checks

    async def details(self) -> dict[str, Any]:
        """What /readyz shows beside its checks (none of it makes the replica unready): the cluster."""
        if self.replica is None:
            return {}
        return {"cluster": await self.replica.status()}

    async def stop(self, *, hurry: asyncio.Event | None = None) -> None:
        """Graceful shutdown, in order (see module docstring).

        `hurry` (the CLI sets it on a second SIGTERM/SIGINT) cuts the wait for running
        turns short: they are interrupted at once and finalized, marked stopped.
        """
        if self.stopping:
            return
        self.stopping = True
        for connector in self.connectors:
            try:
                await connector.stop_receiving()
            except Exception as exc:
                log.warning("%s: error while stopping to receive: %s", connector.platform, describe_error(exc))
        if self.replica is not None:
            self.replica.stop_fetching()  # no new conversations here; other replicas take them
        running = self.gateway.lanes.active
        timeout = self.settings.shutdown_timeout
        if running:
            log.info("stopped receiving; waiting up to %gs for %d running turn(s)", timeout, running)
        elif self.connectors:
            log.info("stopped receiving; no turn is running")
        await self._finish_turns(timeout, hurry)
        if self.replica is not None:
            await self.replica.close(FINALIZE_TIMEOUT)
        for connector in self.connectors:
            await self._close_connector(connector)
        if self.health is not None:
            await self.health.stop()
        if self.mcp is not None:
            await self.mcp.aclose()
        await self.agent.aclose()
        if self.gateway.inbound_rate is not None:
            await self.gateway.inbound_rate.aclose()
        await self.store.close()

    async def _finish_turns(self, timeout: float, hurry: asyncio.Event | None) -> None:
        """Let turns finish up to `timeout`, then interrupt them and wait for their last edit."""
        graceful = asyncio.create_task(self.gateway.shutdown(timeout), name="shutdown")
        hurried = asyncio.create_task(hurry.wait()) if hurry is not None else None
        try:
            waiting = {graceful} if hurried is None else {graceful, hurried}
            await asyncio.wait(waiting, timeout=timeout + FINALIZE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
            if graceful.done():
                if not graceful.cancelled() and graceful.exception() is not None:
                    log.error("error while finishing turns: %s", describe_error(graceful.exception()))
                return
            tasks: set[asyncio.Task[None]] = {graceful}
            if hurried is not None and hurried.done():
                log.warning("stopping the %d running turn(s) now", self.gateway.interrupt_all())
                _, pending = await asyncio.wait(tasks, timeout=FINALIZE_TIMEOUT)
            else:
                pending = tasks
            if pending:
                log.error("running turns did not finish in time; closing anyway")
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            if hurried is not None:
                hurried.cancel()

    async def _close_connector(self, connector: Connector) -> None:
        try:
            await connector.stop()
        except Exception as exc:
            log.warning("%s: error while closing: %s", connector.platform, describe_error(exc))


async def run(settings: Settings, stop: asyncio.Event, hurry: asyncio.Event | None = None) -> None:
    """Start every configured platform, serve until `stop` is set, then shut down gracefully.

    A stop requested while platforms are still connecting cancels the start-up. Raises
    `StartupFailed` (or the store's error) when parley cannot start serving, and
    `PlatformFailed` -- after the same graceful shutdown -- when a platform reported an
    error no retry can fix (a revoked token): its one ERROR line names the cause and the
    fix, and the CLI exits with its own status for the supervisor to act on.
    """
    app = await App.create(settings)
    stopper = asyncio.create_task(stop.wait(), name="stop-requested")
    fatal: asyncio.Task[PlatformHealth] | None = None
    failed: PlatformHealth | None = None
    try:
        connectors = app.platform_connectors()
        fatal = asyncio.create_task(first_fatal(c.health for c in connectors), name="platform-fatal")
        starting = asyncio.create_task(app.start(connectors), name="start")
        await asyncio.wait({starting, stopper, fatal}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            if stopper.done():
                log.info("stop requested while starting")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        else:
            starting.result()
            log.info("parley is running (%s)", ", ".join(c.platform for c in app.connectors))
            if not settings.access.owners:
                # The first thing a new operator needs is their own id; the bot tells anyone
                # without access theirs, so say where to look.
                log.warning(
                    "access.owners is empty: the bot has no owner to /allow anyone. Message the bot: its answer "
                    "(\"... run /allow telegram:<id>\") names your id; put it in access.owners "
                    "(PARLEY_ACCESS__OWNERS) and restart"
                )
            await asyncio.wait({stopper, fatal}, return_when=asyncio.FIRST_COMPLETED)
        failed = _fatal_platform(fatal)
        if failed is not None:
            log.error("%s", failed.fatal_reason)
        log.info("shutting down")
    finally:
        stopper.cancel()
        if fatal is not None:
            fatal.cancel()
        await app.stop(hurry=hurry)
    if failed is not None:
        log.info("parley stopped: %s failed for good", failed.platform)
        raise PlatformFailed(failed.fatal_reason or f"{failed.platform} failed")
    log.info("parley stopped")


def _fatal_platform(task: asyncio.Task[PlatformHealth]) -> PlatformHealth | None:
    """The platform that reported a fatal error, if `task` (a `first_fatal`) saw one."""
    if task.done() and not task.cancelled() and task.exception() is None:
        return task.result()
    return None
