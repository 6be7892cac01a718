"""Point discord.py at any Discord-compatible endpoint: the one place parley patches it.

discord.py has no constructor option for its endpoints. Its REST URL is the class
attribute `discord.http.Route.BASE`, read every time a `Route` is built (webhook and
interaction requests use the same `Route`, so one assignment covers them), and its
Gateway URL is the class attribute `discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`
(`discord.Client` never asks `GET /gateway`; after READY it follows the server's
`resume_gateway_url`, and falls back to `DEFAULT_GATEWAY` after an invalid session).
Setting those two attributes is therefore enough — and necessary — for a REST proxy,
a Gateway proxy, or the fake Discord in `tests/fakes/discord.py`.

Both are **process-wide**: every discord.py client in this process uses the values set
last, so call this before starting clients, and never run clients for two different
endpoints in one process. The call is idempotent. CDN/asset URLs
(`discord.Asset.BASE`) are separate and untouched: parley does not fetch assets.

parley's config exposes these as `discord.api_base` and `discord.gateway_url`, with the
defaults below; the Discord connector calls `point_discord_at` with them at start-up.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from bots.errors import ConfigError

DEFAULT_API_BASE = "https://discord.com/api/v10"
DEFAULT_GATEWAY_URL = "wss://gateway.discord.gg/"


def point_discord_at(api_base: str = DEFAULT_API_BASE, gateway_url: str = DEFAULT_GATEWAY_URL) -> None:
    """Make discord.py send REST calls to `api_base` and open its Gateway at `gateway_url`.

    `api_base` includes the API version (`.../api/v10`, the version discord.py 2.x
    speaks); a trailing slash is ignored. `gateway_url` is a `ws://` or `wss://` URL
    without query (discord.py adds `?v=10&encoding=json&compress=...`).

    Raises ConfigError for a URL with the wrong scheme or no host.
    """
    import discord.gateway
    import discord.http
    import yarl

    api = urlsplit(api_base)
    if api.scheme not in ("http", "https") or not api.netloc:
        raise ConfigError(f"discord.api_base must be an http(s) URL with a host, got {api_base!r}")
    gw = urlsplit(gateway_url)
    if gw.scheme not in ("ws", "wss") or not gw.netloc:
        raise ConfigError(f"discord.gateway_url must be a ws(s) URL with a host, got {gateway_url!r}")
    if gw.query:
        raise ConfigError(f"discord.gateway_url must not carry a query (discord.py adds it), got {gateway_url!r}")

    discord.http.Route.BASE = api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


def current_discord_endpoints() -> tuple[str, str]:
    """The (api_base, gateway_url) discord.py uses now — to restore them after a test."""
    import discord.gateway
    import discord.http

    return discord.http.Route.BASE, str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
