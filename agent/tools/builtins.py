"""Two safe built-in tools: the current date/time, and fetching a URL (off by default).

`fetch_url` is the dangerous one: a model can be talked into requesting internal
addresses (cloud metadata at 169.254.169.254, admin panels on localhost). So it only
speaks http/https, refuses private, loopback, link-local and reserved addresses unless
`allow_private=True` (checked for IP literals *and* for every address a host name
resolves to, at connect time, so redirects and DNS tricks are covered too), follows at
most a few redirects, and bounds both the bytes read and the wall-clock time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from datetime import datetime
from html.parser import HTMLParser
from typing import Annotated, Any
from urllib.parse import urljoin, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from .registry import Tool, tool

__all__ = ["current_time", "make_fetch_url", "is_public_address"]


@tool(timeout=5.0, source="builtin")
async def current_time(timezone: Annotated[str, "IANA time zone, e.g. Europe/Paris or UTC"] = "UTC") -> str:
    """The current date, time and weekday in a time zone."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {timezone!r}") from exc
    now = datetime.now(zone)
    return f"{now.isoformat(timespec='seconds')} ({now.strftime('%A')}, {timezone})"


def is_public_address(host: str) -> bool:
    """True for a globally routable IP address (IPv4-mapped IPv6 judged by its IPv4)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class FetchRefused(Exception):
    """The URL is not allowed (scheme, private address, too many redirects)."""


class _PublicOnlyResolver(AbstractResolver):
    """Resolve names, then drop every non-public address: the check happens at connect time."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        public = [r for r in results if is_public_address(r["host"])]
        if not public:
            raise FetchRefused(f"{host} resolves only to private or reserved addresses")
        return public

    async def close(self) -> None:
        await self._inner.close()


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template", "svg"}
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


_TEXTUAL = ("text/", "application/json", "application/xml", "application/xhtml", "application/ld+json")


def make_fetch_url(
    *,
    max_bytes: int = 200_000,
    timeout: float = 10.0,
    allow_private: bool = False,
    max_redirects: int = 5,
) -> Tool:
    """Build the `fetch_url` tool with its limits baked in."""

    async def fetch_url(url: Annotated[str, "An http:// or https:// URL"]) -> str:
        """Fetch a web page or text document and return its text (size- and time-limited)."""
        async with asyncio.timeout(timeout):
            return await _fetch(url)

    async def _fetch(url: str) -> str:
        resolver = None if allow_private else _PublicOnlyResolver()
        connector = aiohttp.TCPConnector(resolver=resolver, limit=2)
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout),
            headers={"User-Agent": "parley-fetch/0.1", "Accept": "text/html,text/plain,application/json;q=0.9,*/*;q=0.1"},
        ) as session:
            current = url
            for _ in range(max_redirects + 1):
                _check_url(current)
                try:
                    async with session.get(current, allow_redirects=False) as resp:
                        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                            current = urljoin(current, resp.headers["Location"])
                            continue
                        return await _read(current, resp)
                except aiohttp.ClientConnectorError as exc:
                    if isinstance(exc.__cause__, FetchRefused) or "private or reserved" in str(exc):
                        raise FetchRefused(f"refusing to fetch {current}: private or reserved address") from exc
                    raise
            raise FetchRefused(f"too many redirects (more than {max_redirects})")

    def _check_url(url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchRefused(f"only http and https URLs are allowed, not {parts.scheme or 'none'!r}")
        host = parts.hostname
        if not host:
            raise FetchRefused("the URL has no host")
        if allow_private:
            return
        if host in ("localhost",) or host.endswith(".localhost"):
            raise FetchRefused(f"refusing to fetch {host}: loopback address")
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a name: the resolver checks every address at connect time
        if not is_public_address(host):
            raise FetchRefused(f"refusing to fetch {host}: private or reserved address")

    async def _read(url: str, resp: aiohttp.ClientResponse) -> str:
        ctype = resp.headers.get("Content-Type", "")
        if ctype and not ctype.lower().startswith(_TEXTUAL):
            return f"URL: {url}\nStatus: {resp.status}\nContent-Type: {ctype}\n\n[not a text document; content not fetched]"
        chunks: list[bytes] = []
        size = 0
        truncated = False
        while True:
            block = await resp.content.read(min(65536, max_bytes + 1 - size))
            if not block:
                break
            chunks.append(block)
            size += len(block)
            if size > max_bytes:
                truncated = True
                break
        data = b"".join(chunks)[:max_bytes]
        text = data.decode(resp.get_encoding() if resp.charset else "utf-8", errors="replace")
        if "html" in ctype.lower():
            text = html_to_text(text)
        note = f"\n\n[truncated at {max_bytes} bytes]" if truncated else ""
        return f"URL: {url}\nStatus: {resp.status}\nContent-Type: {ctype or 'unknown'}\n\n{text}{note}"

    return tool(fetch_url, timeout=timeout + 1.0, source="builtin" if not allow_private else "builtin:private")  # type: ignore[call-overload]
