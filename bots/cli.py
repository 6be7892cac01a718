"""The `parley` command: run, chat, check, version.

Configuration is validated before anything connects anywhere; a bad file or variable
prints every problem (`key.path: what is wrong`) and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Awaitable, Callable, Sequence

from bots.config import Settings, load_config, report_config_error
from bots.errors import ConfigError
from bots.logs import setup_logging

log = logging.getLogger("parley")


def parley_version() -> str:
    try:
        return version("parley")
    except PackageNotFoundError:
        return "0+unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="A chat gateway for LLM agents (Telegram, Discord).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="YAML config file (default: $PARLEY_CONFIG, else ./parley.yaml if present)")
        p.add_argument("--log-format", choices=("text", "json"), help="log format (default: logging.format)")
        p.add_argument("--log-level", help="log level (default: logging.level)")

    common(sub.add_parser("run", help="start every configured platform in one process"))
    common(sub.add_parser("chat", help="talk to the agent in this terminal (no platform token needed)"))
    common(sub.add_parser("check", help="validate the config and reach the provider and each platform"))
    sub.add_parser("version", help="print parley's version")
    return parser


def _load(args: argparse.Namespace) -> Settings:
    settings = load_config(args.config)
    setup_logging(
        args.log_level or settings.logging.level,
        args.log_format or settings.logging.format,
        secrets=settings.secrets(),
        loggers=settings.logging.loggers,
    )
    return settings


def _serve(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main` until it returns; SIGTERM/SIGINT set its stop event (a second one aborts)."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_signal() -> None:
            if stop.is_set() and task is not None:
                task.cancel()  # a second signal: stop waiting for turns
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await main(stop)

    try:
        asyncio.run(runner())
    except asyncio.CancelledError:
        pass


def cmd_run(args: argparse.Namespace) -> int:
    from bots.app import run

    settings = _load(args)
    _serve(lambda stop: run(settings, stop))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from bots.app import App
    from bots.console import CONSOLE_USER, ConsoleConnector

    settings = _load(args)

    async def main(stop: asyncio.Event) -> None:
        app = await App.create(settings, extra_owners=frozenset({CONSOLE_USER}))
        console = ConsoleConnector()
        try:
            await app.start([console])
            repl = asyncio.create_task(console.run(app.gateway))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({repl, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for t in (repl, stopper):
                t.cancel()
        finally:
            await app.stop()

    _serve(main)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args)
    rows = asyncio.run(_checks(settings))
    width = max(len(name) for name, _, _ in rows)
    ok = all(passed for _, passed, _ in rows)
    for name, passed, detail in rows:
        print(f"{'PASS' if passed else 'FAIL'}  {name.ljust(width)}  {detail}")
    print("all checks passed" if ok else "some checks failed")
    return 0 if ok else 1


async def _checks(settings: Settings) -> list[tuple[str, bool, str]]:
    from agent import Agent

    rows: list[tuple[str, bool, str]] = [("config", True, str(settings.config_file or "defaults + environment"))]

    async def attempt(name: str, probe: Callable[[], Awaitable[str]]) -> None:
        try:
            rows.append((name, True, await asyncio.wait_for(probe(), timeout=30)))
        except asyncio.TimeoutError:
            rows.append((name, False, "no answer within 30 s"))
        except Exception as exc:  # every failure becomes a table row, never a traceback
            rows.append((name, False, _describe(exc)))

    async def store_probe() -> str:
        from bots.store import Store

        store = await Store.open(settings.store.get_secret_value())
        try:
            await store.ping()
            return str(settings.store)
        finally:
            await store.close()

    async def provider_probe() -> str:
        agent = Agent(settings.provider.agent_config())
        try:
            return f"{settings.provider.base_url} model {settings.provider.model}: " + await agent.probe()
        finally:
            await agent.aclose()

    await attempt("store", store_probe)
    await attempt("provider", provider_probe)
    if settings.telegram.enabled:
        from bots.telegram import check as telegram_check

        assert settings.telegram.token is not None
        token = settings.telegram.token.get_secret_value()
        await attempt("telegram", lambda: telegram_check(token, settings.telegram.api_base))
    else:
        rows.append(("telegram", True, "not configured (no token): skipped"))
    if settings.discord.enabled:
        from bots.discord import check as discord_check

        assert settings.discord.token is not None
        dtoken = settings.discord.token.get_secret_value()
        await attempt("discord", lambda: discord_check(dtoken, settings.discord.api_base, settings.discord.gateway_url))
    else:
        rows.append(("discord", True, "not configured (no token): skipped"))
    return rows


def _describe(exc: BaseException) -> str:
    from bots.logs import redact

    text = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}" if str(exc) else text)[:300]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"parley {parley_version()}")
        return 0
    setup_logging("INFO", "text")
    handlers = {"run": cmd_run, "chat": cmd_chat, "check": cmd_check}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        return report_config_error(exc)


if __name__ == "__main__":
    sys.exit(main())
