"""Redis fixtures (a pytest plugin, registered by tests/conftest.py).

- `redis_url`: the test Redis, from `PARLEY_TEST_REDIS_URL` (default
  `redis://127.0.0.1:6379/0`). When it is unreachable the test is skipped with the
  reason -- or fails, when `PARLEY_REQUIRE_REDIS` is set (CI, where Redis runs).
- `redis_prefix`: a key prefix of the test's own (`parley_test_<hex>:`); every key under
  it is deleted afterwards, so repeated and parallel runs never see each other's budgets.
- `redis_client`: a `coredis.Redis` on `redis_url`, to look at what the test left there.

Select the Redis tests with `-m redis` / deselect with `-m "not redis"`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import coredis
import pytest

from agent.urls import url_without_secrets

REDIS_URL_ENV = "PARLEY_TEST_REDIS_URL"
REQUIRE_REDIS_ENV = "PARLEY_REQUIRE_REDIS"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CONNECT_TIMEOUT_S = 2.0

# The first failure to reach Redis, so later cases skip at once instead of waiting again.
_unreachable: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"redis: needs Redis (${REDIS_URL_ENV})")


def _redis_required() -> bool:
    return os.environ.get(REQUIRE_REDIS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _client(url: str) -> coredis.Redis[Any]:
    return coredis.Redis.from_url(url, connect_timeout=CONNECT_TIMEOUT_S, stream_timeout=CONNECT_TIMEOUT_S)


@pytest.fixture
async def redis_url() -> str:
    """The URL of the test Redis (skips, or fails under PARLEY_REQUIRE_REDIS, when it is unreachable)."""
    url = os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)
    reason = _unreachable.get(url)
    if reason is None:
        client = _client(url)
        try:
            await client.ping()
        except Exception as exc:  # refused, timed out, auth: all mean "no test Redis here"
            reason = _unreachable[url] = f"{type(exc).__name__}: {exc}"
        finally:
            client.connection_pool.disconnect()
    if reason is not None:
        message = f"Redis not reachable at {url_without_secrets(url)} ({reason}); set {REDIS_URL_ENV}"
        if _redis_required():
            pytest.fail(f"{message} — required because {REQUIRE_REDIS_ENV} is set", pytrace=False)
        pytest.skip(message)
    return url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[coredis.Redis[Any]]:
    client = _client(redis_url)
    try:
        yield client
    finally:
        client.connection_pool.disconnect()


@pytest.fixture
async def redis_prefix(redis_client: coredis.Redis[Any]) -> AsyncIterator[str]:
    """A key prefix no other test uses; its keys are deleted after the test."""
    prefix = f"parley_test_{uuid.uuid4().hex[:16]}:"
    try:
        yield prefix
    finally:
        keys = [key async for key in redis_client.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis_client.delete(keys)
