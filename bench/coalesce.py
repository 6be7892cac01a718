"""What does the coalescing window add to a message's way to the model?

Split messages become one turn (`bots.coalesce`): a message that may be the first part
of a split paste (3000+ characters, or an album item) waits `chat.coalesce_window` for
its next part; any other message must not wait at all. This measures both, through the
real Telegram connector (python-telegram-bot) against the fake Telegram, with the fake
provider answering -- each fake in its own process (`bench/common.py`), parley in this
one, so its own code can be timed at the seam:

- `added_ms`: from the moment the gateway hands a routed message to the coalescer to
  the moment it goes on to the lane -- the coalescing logic's own cost for a short
  message (target: <= 1 ms), the window for a lone long one;
- `e2e_ms`: from the person sending (the driver's POST to the fake) to the provider
  receiving the request, with the window on and with it off (0): the difference is
  what a person would notice. Each message goes to a fresh private chat, so pacing and
  per-user limits stay out of it.

Prints one JSON object (fields: bench/README.md).

    .venv/bin/python bench/coalesce.py [--runs 10] [--rounds 2] [--window 1.0] [--long-chars 3500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from bench.common import BenchError, Processes, machine_info, start_fake_llm, start_fake_telegram, summary  # noqa: E402
from bots.app import App  # noqa: E402
from bots.config import load_config  # noqa: E402
from bots.inbound import Inbound  # noqa: E402
from tests.fakes.llm import API_KEY  # noqa: E402
from tests.fakes.telegram import DEFAULT_TOKEN  # noqa: E402

TARGETS = {"short_added_ms": 1.0}
FIRST_CHAT = 500_000
TIMEOUT = 60.0


def config(tmp: Path, llm_url: str, tg_url: str, window: float, block: int) -> Path:
    data = {
        "provider": {
            "base_url": llm_url,
            "api_key": API_KEY,
            "model": "fake-model",
            "timeouts": {"connect": 30, "first_token": 60, "idle": 60, "total": 120},
            "max_retries": 0,
        },
        "store": f"sqlite:///{tmp / f'parley-{block}.db'}",
        "access": {"allow_everyone": True, "user_rate": "off"},
        "telegram": {"token": DEFAULT_TOKEN, "api_base": tg_url},
        "chat": {"coalesce_window": {"telegram": window}},
        "shutdown_timeout": 5,
        "logging": {"level": "WARNING"},
    }
    path = tmp / f"parley-{block}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Seam:
    """Times every message from the coalescer's door to the lane's (our own code, wrapped)."""

    def __init__(self, app: App) -> None:
        gateway = app.gateway
        self.entered: dict[str, float] = {}  # "chat:message" -> when offered
        self.added: dict[str, float] = {}  # "chat:message" -> seconds until handed on
        self._changed = asyncio.Event()
        offer: Callable[..., Any] = gateway.coalescer.offer
        submit = gateway._submit_durably  # noqa: SLF001

        def timed_offer(parts: list[Inbound], now: float) -> Any:
            t = time.perf_counter()
            for part in parts:
                self.entered.setdefault(f"{part.chat.chat_id}:{part.message_id}", t)
            return offer(parts, now)

        async def timed_submit(inbound: Inbound) -> None:
            t = time.perf_counter()
            entered = self.entered.get(f"{inbound.chat.chat_id}:{inbound.message_id}")
            if entered is not None:
                self.added[f"{inbound.chat.chat_id}:{inbound.message_id}"] = t - entered
            self._changed.set()
            await submit(inbound)

        gateway.coalescer.offer = timed_offer  # type: ignore[method-assign]
        gateway._submit_durably = timed_submit  # type: ignore[method-assign]  # noqa: SLF001

    async def wait(self, n: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.added) < n:
                self._changed.clear()
                await self._changed.wait()


async def one_setting(
    http: aiohttp.ClientSession, tmp: Path, llm_url: str, tg_url: str, window: float, texts: dict[str, str],
    runs: int, first_chat: int, block: int,
) -> dict[str, dict[str, list[float]]]:
    """Run every kind of message `runs` times with one window; per kind, added and e2e (ms)."""
    settings = load_config(config(tmp, llm_url, tg_url, window, block), env={}, env_file=None)
    app = await App.create(settings)
    await app.start(app.platform_connectors())
    seam = Seam(app)
    results: dict[str, dict[str, list[float]]] = {}
    chat = first_chat
    try:
        # One message first, not counted: the first of a process opens its connections.
        await say_and_wait(http, app, seam, llm_url, tg_url, chat, texts["short"])
        for kind, text in texts.items():
            added, e2e = [], []
            for _ in range(runs):
                chat += 1
                one_added, one_e2e = await say_and_wait(http, app, seam, llm_url, tg_url, chat, text)
                added.append(one_added)
                e2e.append(one_e2e)
            results[kind] = {"added_ms": added, "e2e_ms": e2e}
    finally:
        await app.stop()
    return results


async def say_and_wait(
    http: aiohttp.ClientSession, app: App, seam: Seam, llm_url: str, tg_url: str, chat: int, text: str
) -> tuple[float, float]:
    """One message in a fresh chat, answered; (added by coalescing, sent to model request) in ms."""
    asked = await requests(http, llm_url)
    t0 = time.monotonic()
    async with http.post(f"{tg_url}/_fake/user_says", json={"chat_id": chat, "text": text}) as resp:
        said = await resp.json()
    if not said.get("ok"):
        raise BenchError(f"fake Telegram refused user_says: {said}")
    await seam.wait(len(seam.added) + 1)
    await app.gateway.settle(f"telegram:{chat}")
    done = await requests(http, llm_url)
    if len(done) != len(asked) + 1:
        raise BenchError(f"expected one model request for chat {chat}, got {len(done) - len(asked)}")
    return seam.added[f"{chat}:{said['result']['message_id']}"] * 1000, (done[-1]["t_received"] - t0) * 1000


async def requests(http: aiohttp.ClientSession, llm_url: str) -> list[dict[str, Any]]:
    async with http.get(f"{llm_url.removesuffix('/v1')}/_fake/requests", params={"brief": "1"}) as resp:
        data = await resp.json()
    return [r for r in data["requests"] if r.get("api") != "models"]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info()
    texts = {
        "short": "what is the capital of France?",
        "long": " ".join(f"word{i}" for i in range(args.long_chars))[: args.long_chars],
    }
    with tempfile.TemporaryDirectory(prefix="parley-bench-coalesce-") as tmpdir:
        tmp = Path(tmpdir)
        async with Processes() as procs, aiohttp.ClientSession() as http:
            llm = await start_fake_llm(procs, log_path=tmp / "fake-llm.log")
            tg = await start_fake_telegram(procs, latency=0.0, log_path=tmp / "fake-telegram.log")
            # Alternating blocks (off, on, on, off, ...): drift on a shared machine hits both alike.
            results: dict[float, dict[str, dict[str, list[float]]]] = {0.0: {}, args.window: {}}
            block = 0
            for r in range(args.rounds):
                for window in (0.0, args.window) if r % 2 == 0 else (args.window, 0.0):
                    got = await one_setting(
                        http, tmp, llm.url, tg.url, window, texts, args.runs, FIRST_CHAT + 10_000 * block, block
                    )
                    block += 1
                    for kind, values in got.items():
                        into = results[window].setdefault(kind, {"added_ms": [], "e2e_ms": []})
                        for name, numbers in values.items():
                            into[name] += numbers
            off, on = results[0.0], results[args.window]
    report: dict[str, Any] = {}
    for kind in texts:
        report[kind] = {
            "chars": len(texts[kind]),
            "added_ms": summary(on[kind]["added_ms"], 3),
            "added_ms_max": round(max(on[kind]["added_ms"]), 3),
            "e2e_ms_window_on": summary(on[kind]["e2e_ms"]),
            "e2e_ms_window_off": summary(off[kind]["e2e_ms"]),
            "e2e_added_ms": round(
                summary(on[kind]["e2e_ms"])["median"] - summary(off[kind]["e2e_ms"])["median"], 2
            ),
        }
    return {
        "bench": "coalesce",
        "params": {"runs": args.runs, "rounds": args.rounds, "window_s": args.window, "long_chars": args.long_chars},
        "targets": TARGETS,
        **report,
        "machine": machine,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="messages of each kind per block")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of one block per setting (off/on, then on/off)")
    parser.add_argument("--window", type=float, default=1.0, help="chat.coalesce_window for Telegram, s")
    parser.add_argument("--long-chars", type=int, default=3500, help="length of the long (may be split) message")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
