"""The `parley` command line: version, check, and configuration errors -- as real processes.

`parley check` runs against the fake Telegram, Discord and LLM on 127.0.0.1. Failure
cases run concurrently (each is a separate process) to keep the file fast.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tomllib
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from tests.support.stack import deep_merge, parley_config
from tests.support.process import REPO, Finished, child_env, run_cli, write_config

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def rows(result: Finished) -> dict[str, tuple[str, str]]:
    """`parley check`'s table: name -> (PASS|WARN|FAIL, detail)."""
    table = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(PASS|WARN|FAIL)  (\S+) +(.*)$", line)
        if match:
            table[match.group(2)] = (match.group(1), match.group(3))
    return table


@pytest.fixture
async def provider_sentinel() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 that records every request: (base_url, requests).

    The fake LLM does not record `GET /models`, so "was the provider contacted?" is
    answered by pointing `provider.base_url` here.
    """
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.json_response({"error": {"message": "sentinel"}}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1", seen
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- version


async def test_version_prints_the_project_version(tmp_path: Path) -> None:
    result = await run_cli(["version"], cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"parley {VERSION}\n", "")


async def test_the_installed_console_script_runs_the_cli(tmp_path: Path) -> None:
    # `pyproject.toml` declares `parley = "bots.cli:main"`; `pip install -e .` puts it next
    # to the interpreter. (Absent means the package is not installed: that is a failure.)
    script = Path(sys.executable).parent / "parley"
    assert script.exists(), f"{script} missing: run `pip install -e .`"
    result = await run_cli(["version"], cwd=tmp_path, program=[str(script)])
    assert (result.returncode, result.stdout) == (0, f"parley {VERSION}\n")


# --------------------------------------------------------------------------- check


async def test_check_against_the_fakes_passes(tmp_path: Path, fake_llm, fast_telegram, fast_discord) -> None:
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm, telegram=fast_telegram, discord=fast_discord))
    result = await run_cli(["check", "--config", str(path)], cwd=tmp_path)
    assert result.returncode == 0, result.output
    table = rows(result)
    assert list(table) == ["config", "store", "provider", "tools", "telegram", "discord"]
    assert all(verdict == "PASS" for verdict, _ in table.values()), result.stdout
    assert table["config"][1] == str(path)
    assert table["tools"][1] == "1 tool(s): current_time"
    assert "fake-model" in table["provider"][1]
    assert table["telegram"][1] == "logged in as @parley_bot"
    assert table["discord"][1] == "logged in as fakebot"
    assert result.stdout.splitlines()[-1] == "all 6 checks passed"
    # It reached every platform and the provider, and started nothing: no polling, no
    # gateway session, and no database created or migrated.
    assert [c.method for c in fast_telegram.calls] == ["getMe"]
    assert not fast_discord.sessions
    assert table["provider"][1] == f"{fake_llm.base_url}: fake-model, other-model among the 2 models GET /models lists"
    assert not (tmp_path / "parley.db").exists()
    assert "Traceback" not in result.output


async def test_check_names_each_failure_and_exits_1(tmp_path: Path, fake_llm, fast_telegram, fast_discord) -> None:
    base = parley_config(tmp_path, fake_llm, telegram=fast_telegram, discord=fast_discord)
    cases: dict[str, tuple[dict[str, Any], str, str]] = {
        "wrong-telegram-token": (
            {"telegram": {"token": "123456:not-the-right-token"}},
            "telegram", "the token was rejected (Unauthorized) -- check telegram.token",
        ),
        "wrong-discord-token": (
            {"discord": {"token": "not-the-right-discord-token"}},
            "discord", "the token was rejected (401 Unauthorized) -- check discord.token",
        ),
        "unreachable-provider": (
            {"provider": {"base_url": "http://127.0.0.1:1/v1"}},
            "provider", "couldn't connect to the provider: connection refused (ConnectionRefusedError",
        ),
        "wrong-api-key": (
            {"provider": {"api_key": "sk-not-the-right-key-0000"}},
            "provider", "-- check provider.api_key",
        ),
    }

    async def check(name: str, change: dict[str, Any]) -> Finished:
        directory = tmp_path / name
        directory.mkdir()
        from tests.support.stack import deep_merge

        path = write_config(directory, deep_merge(base, change))
        return await run_cli(["check", "--config", str(path)], cwd=directory)

    results = await asyncio.gather(*(check(name, change) for name, (change, _, _) in cases.items()))
    for (name, (_, failing, words)), result in zip(cases.items(), results):
        table = rows(result)
        assert result.returncode == 1, f"{name}: {result.output}"
        assert [k for k, (verdict, _) in table.items() if verdict == "FAIL"] == [failing], f"{name}: {result.stdout}"
        assert words in table[failing][1], f"{name}: {table[failing][1]!r}"
        assert f"1 of 6 checks failed: {failing}" in result.stdout
        assert "Traceback" not in result.output, name
    unreachable = rows(results[2])["provider"][1]
    assert "is provider.base_url (http://127.0.0.1:1/v1) right and reachable?" in unreachable
    wrong_key = results[3].output
    assert "sk-not-the-right-key-0000" not in wrong_key


async def test_check_fails_on_a_model_the_provider_does_not_list(tmp_path: Path, fake_llm) -> None:
    """It used to print `PASS provider ... gpt-nonexistent not listed` and exit 0."""
    base = parley_config(tmp_path, fake_llm)
    cases = {
        "default-model": ({"provider": {"model": "gpt-nonexistent"}}, "gpt-nonexistent is not", "provider.model"),
        "switchable-model": ({"provider": {"models": ["other-model", "gpt-gone"]}}, "gpt-gone is not",
                             "provider.models"),
    }

    async def check(name: str, change: dict[str, Any]) -> Finished:
        directory = tmp_path / name
        directory.mkdir()
        path = write_config(directory, deep_merge(base, change))
        return await run_cli(["check", "--config", str(path)], cwd=directory)

    results = await asyncio.gather(*(check(name, change) for name, (change, _, _) in cases.items()))
    for (name, (_, words, key)), result in zip(cases.items(), results):
        table = rows(result)
        assert result.returncode == 1, f"{name}: {result.output}"
        assert table["provider"][0] == "FAIL", f"{name}: {result.stdout}"
        detail = table["provider"][1]
        assert detail.endswith(f"{words} among the 2 models GET /models lists (fake-model, other-model) -- check {key}")
        assert result.stdout.splitlines()[-1] == "1 of 6 checks failed: provider", name
    assert fake_llm.requests == []  # the listing decided: no token was spent


async def test_check_warns_without_a_models_endpoint_and_strict_fails(tmp_path: Path, fake_llm) -> None:
    fake_llm.listed_models = None  # a local server with no GET /models
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm))
    lenient, strict = await asyncio.gather(
        run_cli(["check", "--config", str(path)], cwd=tmp_path),
        run_cli(["check", "--strict", "--config", str(path)], cwd=tmp_path),
    )
    for result in (lenient, strict):
        verdict, detail = rows(result)["provider"]
        assert verdict == "WARN", result.stdout
        assert detail == (
            f"{fake_llm.base_url}: the provider has no /models endpoint (GET /models answered 404), so which "
            "models it serves is unknown; fake-model answered a 1-token request; not checked: other-model"
        )
        assert "Traceback" not in result.output
    assert lenient.returncode == 0, lenient.output
    assert lenient.stdout.splitlines()[-1] == (
        "all 6 checks passed, 1 with a warning: provider (--strict makes warnings failures)"
    )
    assert strict.returncode == 1, strict.output
    assert strict.stdout.splitlines()[-1] == "1 of 6 checks failed (--strict counts warnings): provider"


async def test_strict_check_passes_when_nothing_warns(tmp_path: Path, fake_llm) -> None:
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm))
    result = await run_cli(["check", "--strict", "--config", str(path)], cwd=tmp_path)
    assert result.returncode == 0, result.output
    assert {verdict for verdict, _ in rows(result).values()} == {"PASS"}


# --------------------------------------------------------------------------- configuration errors


async def test_config_errors_exit_2_naming_key_and_problem_before_contacting_anything(
    tmp_path: Path, fake_llm, fast_telegram, fast_discord, provider_sentinel
) -> None:
    sentinel_url, provider_requests = provider_sentinel
    good = parley_config(tmp_path, fake_llm, telegram=fast_telegram, discord=fast_discord,
                         overrides={"provider": {"base_url": sentinel_url}})
    openai_without_key = {**good, "provider": {"base_url": "https://api.openai.com/v1", "api_key": "env:OPENAI_API_KEY"}}
    cases: list[tuple[str, str, Any, dict[str, str], str]] = [
        # (name, command, config (dict, raw YAML text or None: no file), env, expected line)
        ("malformed-yaml", "check", "provider: {model: [unclosed\n", {},
         ": malformed YAML at line 2, column 1"),
        ("unknown-key", "check", {**good, "telegram": {**good["telegram"], "tokn": "x"}}, {},
         "telegram.tokn: unknown key (did you mean 'token'?)"),
        ("wrong-type", "run", {**good, "provider": {**good["provider"], "timeouts": {"idle": "abc"}}}, {},
         "provider.timeouts.idle: Input should be a valid number, unable to parse string as a number (got 'abc')"),
        ("missing-secret", "check", openai_without_key, {},
         "provider.api_key: environment variable OPENAI_API_KEY is not set; "
         "https://api.openai.com/v1 requires an API key"),
        ("bad-environment-override", "run", good, {"PARLEY_CHAT__BUSY_POLICY": "shout"},
         "chat.busy_policy: Input should be 'queue' or 'interrupt' (got 'shout') "
         "[set by environment variable PARLEY_CHAT__BUSY_POLICY]"),
        ("env-typo", "chat", good, {"PARLEY_TELEGRAM_TOKEN": "123:abc"},
         "telegram.token: environment variable PARLEY_TELEGRAM_TOKEN is ignored: "
         "nesting uses two underscores, PARLEY_TELEGRAM__TOKEN"),
        ("file-not-found", "check", None, {}, "missing.yaml: config file not found"),
        ("no-platform", "run", {k: v for k, v in good.items() if k not in ("telegram", "discord")}, {},
         "telegram.token, discord.token: no platform has a token"),
    ]

    async def attempt(name: str, command: str, config: Any, env: dict[str, str]) -> Finished:
        directory = tmp_path / name
        directory.mkdir()
        if config is None:
            path = directory / "missing.yaml"
        elif isinstance(config, str):
            path = directory / "parley.yaml"
            path.write_text(config)
        else:
            path = write_config(directory, config)
        return await run_cli([command, "--config", str(path)], cwd=directory, env=child_env(env))

    results = await asyncio.gather(*(attempt(n, cmd, cfg, env) for n, cmd, cfg, env, _ in cases))
    for (name, _, _, _, expected), result in zip(cases, results):
        assert result.returncode == 2, f"{name}: {result.output}"
        assert result.stdout == "", name
        lines = result.stderr.splitlines()
        assert lines[0].startswith("parley: invalid configuration"), f"{name}: {result.stderr}"
        assert any(expected in line for line in lines[1:]), f"{name}: expected {expected!r} in\n{result.stderr}"
        assert "Traceback" not in result.stderr, name
    assert provider_requests == [] and fast_telegram.calls == [] and fast_discord.calls == []
    assert not any(tmp_path.glob("*/parley.db")), "a store was opened"


async def test_config_error_with_json_logs_is_one_json_line(tmp_path: Path) -> None:
    path = tmp_path / "parley.yaml"
    path.write_text("provider: {api: chat, base_url: 'http://127.0.0.1:1/v1'}\nflavour: vanilla\n")
    result = await run_cli(["check", "--config", str(path), "--log-format", "json"], cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["msg"] == "invalid configuration"
    assert record["file"] == str(path)
    assert json.loads(record["problems"]) == [
        "provider.api: Input should be 'chat_completions' or 'responses' (got 'chat')",
        "flavour: unknown key",
    ]


@pytest.mark.parametrize("command", ["run", "chat", "check"])
def test_every_command_takes_the_same_options(command: str) -> None:
    from bots.cli import _parser

    args = _parser().parse_args([command, "--config", "x.yaml", "--log-format", "json", "--log-level", "debug"])
    assert (args.command, args.config, args.log_format, args.log_level) == (command, "x.yaml", "json", "DEBUG")


async def test_check_starts_each_mcp_server_once_and_names_a_broken_one(tmp_path: Path, fake_llm) -> None:
    tools = {
        "mcp_servers": [
            {"name": "fake", "command": sys.executable, "args": ["-m", "tests.fakes.mcp_server", "stdio"],
             "cwd": str(REPO), "env": {"FAKE_TOKEN": "env:FAKE_MCP_TOKEN"}},
            {"name": "broken", "command": str(tmp_path / "no-such-program"), "startup_timeout": 5},
        ],
        "policy": {"nothing_by_this_name": {"allow": "user"}},
    }
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm, overrides={"tools": tools}))
    env = {"FAKE_MCP_TOKEN": "sk-mcp-secret-value-123"}
    result = await run_cli(["check", "--config", str(path)], cwd=tmp_path, env=env)
    assert result.returncode == 1, result.output
    table = rows(result)
    assert table["mcp:fake"][0] == "PASS" and re.fullmatch(r"stdio: \d+ tool\(s\)", table["mcp:fake"][1])
    assert table["mcp:broken"][0] == "FAIL" and "no-such-program" in table["mcp:broken"][1]
    assert table["tools"] == ("WARN", "1 tool(s): current_time; tools.policy names no such tool: nothing_by_this_name")
    assert "sk-mcp-secret-value-123" not in result.output


async def test_check_reaches_every_named_provider(tmp_path: Path, fake_llm) -> None:
    config = parley_config(tmp_path, fake_llm)
    del config["provider"]
    config["providers"] = {
        "main": {"base_url": fake_llm.base_url, "api_key": fake_llm.api_key, "max_retries": 0},
        "spare": {"base_url": "http://127.0.0.1:9/v1", "max_retries": 0},
    }
    config["models"] = [
        {"name": "fake-model", "provider": "main"},
        {"name": "ghost", "provider": "main", "id": "not-served"},
        {"name": "backup", "provider": "spare"},
    ]
    config["fallback"] = ["backup"]
    path = write_config(tmp_path, config)
    result = await run_cli(["check", "--config", str(path)], cwd=tmp_path)
    assert result.returncode == 1, result.output
    table = rows(result)
    assert table["provider:main"][0] == "FAIL" and table["provider:main"][1].endswith("-- check models[1].id")
    assert table["provider:spare"][0] == "FAIL"
    assert "is providers.spare.base_url (http://127.0.0.1:9/v1) right and reachable?" in table["provider:spare"][1]


async def test_check_in_cluster_mode_reaches_redis(tmp_path: Path, fake_llm, postgres_url: str, redis_url: str) -> None:
    config = parley_config(tmp_path, fake_llm, overrides={
        "store": postgres_url,
        "cluster": {"enabled": True, "redis_url": "env:REDIS_URL"},
    })
    path = write_config(tmp_path, config)
    up = await run_cli(["check", "--config", str(path)], cwd=tmp_path, env={"REDIS_URL": redis_url})
    assert rows(up)["redis"][0] == "PASS", up.output
    dead = "redis://:r3disSecret99@127.0.0.1:9/0"  # nothing listens on port 9
    down = await run_cli(["check", "--config", str(path)], cwd=tmp_path, env={"REDIS_URL": dead})
    assert down.returncode == 1
    verdict, detail = rows(down)["redis"]
    assert verdict == "FAIL" and "Connect call failed" in detail, down.output
    assert "r3disSecret99" not in down.output
