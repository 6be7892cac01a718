"""The `parley` command: run, chat, check, version.

Configuration is validated before anything connects anywhere; a bad file or variable
prints every problem (`key.path: what is wrong`) and exits with status 2. Other failures
to start (a platform refusing the token, a port already taken, an unreachable database)
print one line naming the cause and exit with status 1 -- never a traceback, so the
operator reads the cause rather than the call stack. A platform that fails for good
while `run` serves (a token revoked, an intent withdrawn) logs one ERROR line naming the
cause and the fix; parley then shuts down gracefully and exits with status 3.

Signals (`run`, and SIGTERM for `chat`): the first SIGTERM or SIGINT stops taking new
messages and lets running turns finish for up to `shutdown_timeout`; a second one
interrupts them at once (their live messages are finalized, marked stopped); a third
exits immediately.

SIGINT in `parley chat` is Ctrl-C of a person at a keyboard (`ConsoleConnector.interrupt`):
at a terminal it stops the running reply at once and returns to the prompt, and at the
prompt it ends the session (status 0); off a terminal it stops the reply and exits with
status 130. Off a terminal, a reply that fails for good (the provider failed the fallback
request too) ends the session with status 4, the rest of the input unread -- so
`parley chat < questions.txt > answers.md` can be checked by a script. Once the session
is ending, further SIGINTs escalate as above.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

from bots.config import Settings, load_config, report_config_error
from bots.errors import ConfigError, ParleyError, PlatformFailed
from bots.logs import setup_logging

log = logging.getLogger("parley")

EXIT_OK = 0
EXIT_FAILED = 1  # could not start, or `parley check` found a problem
EXIT_CONFIG = 2  # invalid configuration (nothing was contacted)
EXIT_PLATFORM = 3  # a platform failed for good while running (token revoked...): restart, and alert someone
EXIT_REPLY_FAILED = 4  # `parley chat` off a terminal: a reply failed for good; the rest of the input was not read
EXIT_INTERRUPTED = 128 + signal.SIGINT  # `parley chat` off a terminal: stopped by Ctrl-C (130, as shells report it)

CHECK_TIMEOUT = 30.0  # seconds for each `parley check` probe


def parley_version() -> str:
    """The installed distribution's version, else the source tree's pyproject.toml."""
    try:
        return version("parley")
    except PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        import tomllib

        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "0+unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="A chat gateway for LLM agents (Telegram, Discord).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="YAML config file (default: $PARLEY_CONFIG, else ./parley.yaml if present)")
        p.add_argument("--log-format", choices=("text", "json"), help="log format (default: logging.format)")
        p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                       help="log level (default: logging.level)")

    common(sub.add_parser("run", help="start every configured platform in one process"))
    common(sub.add_parser("chat", help="talk to the agent in this terminal (no platform token needed)"))
    check = sub.add_parser("check", help="validate the config and reach the provider and each platform")
    common(check)
    check.add_argument("--strict", action="store_true",
                       help="treat warnings (e.g. a provider without /models) as failures")
    sub.add_parser("version", help="print parley's version")
    return parser


def _load(args: argparse.Namespace, *, quiet_libraries: dict[str, str] | None = None,
          default_level: str | None = None) -> Settings:
    """Validate the configuration, then log the way it says (the CLI flags win)."""
    settings = load_config(args.config)
    level = args.log_level or default_level or settings.logging.level
    setup_logging(
        level,
        args.log_format or settings.logging.format,
        secrets=settings.secrets(),
        loggers={**((quiet_libraries or {}) if level != "DEBUG" else {}), **settings.logging.loggers},
    )
    return settings


# --------------------------------------------------------------------------- signals


class Signals:
    """SIGTERM/SIGINT escalate: the first sets `stop`, the next `hurry`, the one after aborts.

    Each signal moves one step further than what is already under way: once `stop` is set
    (by a signal, or because `parley chat`'s session ended), the next one hurries.
    """

    def __init__(self, main_task: asyncio.Task[Any]) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.count = 0
        self.last: int | None = None
        self._main = main_task

    def received(self, sig: int) -> None:
        self.count += 1
        self.last = sig
        name = signal.Signals(sig).name
        if not self.stop.is_set():
            log.info("%s received: stopping (send it again to stop running turns at once)", name)
            self.stop.set()
        elif not self.hurry.is_set():
            log.warning("%s received again: interrupting running turns now (another one exits at once)", name)
            self.hurry.set()
        else:
            log.error("%s received again: exiting now", name)
            self._main.cancel()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.received, sig)


def _serve(main: Callable[[Signals], Awaitable[int | None]]) -> int:
    """Run `main` until it returns (its exit status; None is 0), with SIGTERM/SIGINT
    handled as described in the module doc."""
    signals: Signals | None = None

    async def runner() -> int | None:
        nonlocal signals
        task = asyncio.current_task()
        assert task is not None
        signals = Signals(task)
        signals.install(asyncio.get_running_loop())
        return await main(signals)

    try:
        status = asyncio.run(runner())
    except asyncio.CancelledError:  # the last signal
        last = signals.last if signals is not None and signals.last is not None else signal.SIGTERM
        return 128 + int(last)
    return EXIT_OK if status is None else status


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from bots.app import run
    from bots.config import ConfigProblems, Problem

    settings = _load(args)
    if not settings.enabled_platforms():
        raise ConfigProblems(
            [Problem("telegram.token, discord.token",
                     "no platform has a token, so `parley run` has nothing to serve; set TELEGRAM_BOT_TOKEN "
                     "and/or DISCORD_BOT_TOKEN (or try the agent in a terminal with `parley chat`)")],
            source=settings.config_file,
        )
    return _serve(lambda signals: run(settings, signals.stop, signals.hurry))


def cmd_chat(args: argparse.Namespace) -> int:
    from bots.app import App
    from bots.console import CONSOLE_USER, ConsoleConnector, SessionEnd

    # Log lines would interleave with the conversation in the terminal: warnings only,
    # unless --log-level asks for more.
    settings = _load(args, default_level="WARNING")
    statuses = {SessionEnd.DONE: EXIT_OK, SessionEnd.REPLY_FAILED: EXIT_REPLY_FAILED,
                SessionEnd.INTERRUPTED: EXIT_INTERRUPTED}

    async def main(signals: Signals) -> int:
        # The store may be shared with a running `parley run`: its running turns are not stale.
        app = await App.create(settings, extra_owners=frozenset({CONSOLE_USER}), recover=False)
        console = ConsoleConnector()
        status = EXIT_OK
        try:
            await app.start([console], serve_health=False)
            # Ctrl-C is the console's (stop the reply, or end the session); once the
            # session is ending, further ones escalate like any shutdown signal.
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGINT, lambda: console.interrupt() or signals.received(signal.SIGINT)
            )
            repl = asyncio.create_task(console.run(app.gateway))
            stopper = asyncio.create_task(signals.stop.wait())
            await asyncio.wait({repl, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not repl.done():
                repl.cancel()
            ended, _ = await asyncio.gather(repl, stopper, return_exceptions=True)
            if isinstance(ended, Exception):
                raise ended
            if isinstance(ended, SessionEnd):
                status = statuses[ended]
        finally:
            signals.stop.set()  # the session is over: a signal from here on hurries the shutdown
            await app.stop(hurry=signals.hurry)
        return status

    return _serve(main)


def cmd_check(args: argparse.Namespace) -> int:
    """Print one PASS / WARN / FAIL row per check; exit 1 on a FAIL (or a WARN with --strict).

    WARN is for what could not be verified rather than found wrong -- a provider with no
    `/models` listing cannot say whether it serves every configured model. A deployment
    pipeline that must not start on a guess runs `parley check --strict`.
    """
    # discord.py warns about intents and voice support when the probe logs in; noise here.
    settings = _load(args, quiet_libraries={"discord": "ERROR"})
    rows = asyncio.run(_checks(settings))
    width = max(len(row.name) for row in rows)
    for row in rows:
        print(f"{row.verdict}  {row.name.ljust(width)}  {row.detail}")
    if not settings.enabled_platforms():
        print("note: no platform has a token: `parley run` would have nothing to serve (`parley chat` needs none)")
    failed = [row.name for row in rows if row.verdict == FAIL]
    warned = [row.name for row in rows if row.verdict == WARN]
    if args.strict and warned:
        failed = [row.name for row in rows if row.verdict in (FAIL, WARN)]
        print(f"{len(failed)} of {len(rows)} checks failed (--strict counts warnings): {', '.join(failed)}")
        return EXIT_FAILED
    if failed:
        print(f"{len(failed)} of {len(rows)} checks failed: {', '.join(failed)}")
        return EXIT_FAILED
    if warned:
        print(f"all {len(rows)} checks passed, {len(warned)} with a warning: {', '.join(warned)} "
              "(--strict makes warnings failures)")
        return EXIT_OK
    print(f"all {len(rows)} checks passed")
    return EXIT_OK


PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


class Row(NamedTuple):
    """One line of `parley check`'s table."""

    name: str
    verdict: str  # PASS | WARN | FAIL
    detail: str


class _Verdict(Exception):
    """Raised by a probe whose answer is a WARN or a FAIL without an underlying error."""

    def __init__(self, verdict: str, detail: str) -> None:
        super().__init__(detail)
        self.verdict = verdict
        self.detail = detail


async def _checks(settings: Settings) -> list[Row]:
    """Probe the store, the provider and every configured platform, all at once."""

    async def attempt(name: str, probe: Callable[[], Awaitable[str]]) -> Row:
        try:
            return Row(name, PASS, await asyncio.wait_for(probe(), timeout=CHECK_TIMEOUT))
        except _Verdict as verdict:
            return Row(name, verdict.verdict, verdict.detail)
        except TimeoutError:
            return Row(name, FAIL, f"no answer within {CHECK_TIMEOUT:g} s" + _hint(name, None, settings))
        except Exception as exc:  # every failure becomes a table row, never a traceback
            return Row(name, FAIL, _describe(exc) + _hint(name, exc, settings))

    probes: list[Awaitable[Row]] = [
        attempt("store", lambda: _probe_store(settings)),
        *(
            [attempt(f"provider:{name}", lambda name=name: _probe_named_provider(settings, name))
             for name in settings.providers]
            if settings.providers else [attempt("provider", lambda: _probe_provider(settings))]
        ),
        attempt("tools", lambda: _probe_tools(settings)),
    ]
    if settings.cluster.enabled:
        probes.append(attempt("redis", lambda: _probe_redis(settings)))
    for server in settings.tools.mcp_servers:
        if server.enabled:
            probes.append(attempt(f"mcp:{server.name}", lambda server=server: _probe_mcp(server)))
    skipped: list[Row] = []
    for platform in ("telegram", "discord"):
        section = getattr(settings, platform)
        if section.enabled:
            probes.append(attempt(platform, lambda platform=platform: _probe_platform(settings, platform)))
        else:
            var = section.unset_env.get("token")
            why = f" ({var} is not set)" if var else ""
            skipped.append(Row(platform, PASS, f"skipped: no token{why}, so it will not be started"))
    rows = [Row("config", PASS, str(settings.config_file or "no file: defaults + environment"))]
    rows.extend(await asyncio.gather(*probes))
    return rows + skipped


async def _probe_redis(settings: Settings) -> str:
    """Cluster mode: reach the Redis the replicas share their rate budgets through (a PING)."""
    from coredis import Redis
    from coredis.retry import NoRetryPolicy

    from agent.urls import url_without_secrets

    assert settings.cluster.redis_url is not None
    url = settings.cluster.redis_url.get_secret_value()
    client: Redis[bytes] = Redis.from_url(
        url, connect_timeout=CHECK_TIMEOUT, stream_timeout=CHECK_TIMEOUT, retry_policy=NoRetryPolicy()
    )
    try:
        await client.ping()
    finally:
        client.connection_pool.disconnect()
    return f"{url_without_secrets(url)}: reachable (shared rate budgets)"


async def _probe_store(settings: Settings) -> str:
    """Reach the database and read its schema revision -- without creating or migrating it."""
    from bots import migrations
    from bots.store import Store, create_engine

    url = settings.store
    if url.kind == "sqlite" and url.database and not Path(url.database).exists():
        return f"{url}: no database yet; `parley run` creates it"
    store = Store(create_engine(url.get_secret_value()), display_url=url.masked(), utcnow=lambda: datetime.now(UTC))
    try:
        revision = await store.schema_revision()
    finally:
        await store.close()
    head = migrations.head_revision()
    if revision == head:
        return f"{url}: schema up to date ({head})"
    if revision is None:
        return f"{url}: reachable, no schema yet; `parley run` creates it ({head})"
    return f"{url}: schema at {revision}; `parley run` migrates it to {head}"


async def _probe_provider(settings: Settings) -> str:
    """Reach the provider and make sure it serves `provider.model` and every `provider.models`."""
    provider = settings.provider
    keys = [("provider.model", provider.model), *(("provider.models", m) for m in provider.models)]
    return await _probe_endpoint(provider, provider.model, keys)


async def _probe_named_provider(settings: Settings, name: str) -> str:
    """Reach one of `providers` and make sure it serves every model `models` names for it."""
    keys = [(f"models[{i}].id", m.id or m.name) for i, m in enumerate(settings.models) if m.provider == name]
    return await _probe_endpoint(settings.providers[name], keys[0][1] if keys else "unused", keys)


async def _probe_endpoint(endpoint: Any, default: str, keys: list[tuple[str, str]]) -> str:
    """Reach an endpoint with its key; FAIL naming the key (`keys`: (key, model id)) of each
    model its listing lacks.

    A model the provider does not serve passes every other check and then fails each turn
    ("model not found"), so a listing without it is a FAIL naming the key to fix; a
    provider with no listing is a WARN, since only the default model could be tried.
    """
    from agent import Agent

    agent = Agent(endpoint.agent_config(default))
    try:
        result = await agent.probe(list(dict.fromkeys(model for _, model in keys)))
    finally:
        await agent.aclose()
    detail = f"{endpoint.base_url}: {result}"
    if result.missing:
        named = dict.fromkeys(key for key, model in keys if model in result.missing)
        raise _Verdict(FAIL, f"{detail} -- check {' and '.join(named)}")
    if result.listed is None:
        raise _Verdict(WARN, detail)
    return detail


async def _probe_tools(settings: Settings) -> str:
    """Load the built-ins, the config's modules and the entry points, as `parley run` would.

    A policy key that names no such tool (and no MCP server's: those contain "__") is a
    WARN: a typo there would silently leave a tool with its default policy."""
    from bots.app import build_tools, tool_policy

    registry = build_tools(settings)
    names = registry.names()
    detail = f"{len(names)} tool(s): {', '.join(names) or 'none'}"
    unmatched = [key for key in tool_policy(settings).unmatched(names) if "__" not in key]
    if unmatched:
        raise _Verdict(WARN, f"{detail}; tools.policy names no such tool: {', '.join(unmatched)}")
    return detail


async def _probe_mcp(server: Any) -> str:
    """Start (or reach) one MCP server, list its tools, stop it."""
    from agent.tools import ToolRegistry
    from agent.tools.mcp import McpServers

    servers = McpServers([server.server_config()], ToolRegistry())
    (status,) = await servers.check()
    if status.state != "ready":
        raise _Verdict(FAIL, f"{status.transport}: {status.error or status.state}")
    return f"{status.transport}: {status.tools} tool(s)"


async def _probe_platform(settings: Settings, platform: str) -> str:
    if platform == "telegram":
        from bots.telegram import check as telegram_check

        assert settings.telegram.token is not None
        who = await telegram_check(settings.telegram.token.get_secret_value(), settings.telegram.api_base)
    else:
        from bots.discord import check as discord_check

        section = settings.discord
        assert section.token is not None
        who = await discord_check(section.token.get_secret_value(), section.api_base, section.gateway_url)
    return f"logged in as {who}"


def _describe(exc: BaseException) -> str:
    from bots.app import describe_error

    return describe_error(exc)[:300]


def _hint(name: str, exc: BaseException | None, settings: Settings) -> str:
    """What to look at, by which check failed and how."""
    from agent import errors as agent_errors

    text = str(exc or "").lower()
    if name == "provider" or name.startswith("provider:"):
        named = name.partition(":")[2]
        key = f"providers.{named}" if named else "provider"
        base_url = settings.providers[named].base_url if named else settings.provider.base_url
        if isinstance(exc, agent_errors.ProviderAuthError):
            return f" -- check {key}.api_key"
        if isinstance(exc, agent_errors.ProviderBadRequest):
            return " -- check provider.model" if key == "provider" else " -- check models"
        return f" -- is {key}.base_url ({base_url}) right and reachable?"
    if name in ("telegram", "discord"):
        if "token" in text or "unauthorized" in text:
            return f" -- check {name}.token"
        return f" -- is {name}.api_base ({getattr(settings, name).api_base}) reachable?"
    if name == "store":
        return " -- check store"
    return ""


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"parley {parley_version()}")
        return EXIT_OK
    # Until the configuration is read: the flags, else defaults (secrets are added later).
    setup_logging(args.log_level or "INFO", args.log_format or "text")
    handlers = {"run": cmd_run, "chat": cmd_chat, "check": cmd_check}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        if args.log_format == "json":  # keep stderr one JSON object per line
            problems = [str(p) for p in getattr(exc, "problems", [])] or str(exc).splitlines()
            source = getattr(exc, "source", None)
            log.error("invalid configuration", extra={"problems": problems, "file": str(source) if source else None})
            return EXIT_CONFIG
        return report_config_error(exc)
    except PlatformFailed:  # `run` logged the cause and the fix, then shut down gracefully
        return EXIT_PLATFORM
    except (ParleyError, OSError) as exc:  # StartupFailed, StoreError, an unusable data directory...
        from bots.app import describe_error

        log.error("parley %s: cannot start: %s", args.command, describe_error(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        return 128 + signal.SIGINT
    except Exception:  # a bug: the traceback goes through the log (redacted)
        log.exception("parley %s: unexpected error", args.command)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
