"""What may be shown of a configured URL (in a chat, a status line, an error)."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["url_without_secrets"]


def url_without_secrets(url: str) -> str:
    """`scheme://host[:port]/path` of `url`: no user, password, query or fragment.

    Credentials hide in the userinfo (`https://user:pass@host`) and in query parameters
    (`?api-key=...`); redacting known shapes is not enough there, so those parts are
    dropped whole.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}".rstrip("/") if parts.scheme else "(not a URL)"
