"""The agent's small error hierarchy.

Callers act on the class, not on strings: the gateway tells the user "the provider
rejected the API key" for `ProviderAuthError`, "the provider had an internal error" for
`ProviderServerError`, "isn't reachable" for `ProviderUnavailable`, and so on. Every
`ProviderError` carries the provider's own message (API keys scrubbed) for logs and
operator commands, and -- because "turn failed: ProviderUnavailable" tells an operator
nothing to act on -- what `describe()` and `log_fields()` need to name the cause: the root
exception under the SDK's wrappers (`ConnectionRefusedError`, not "Request timed out"),
the HTTP status, the provider's host and the model.

Streaming problems never surface as these: a broken stream is answered by a
non-streaming request (see `agent.provider`); only when *that* fails does its error
propagate, typed.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ToolError(AgentError):
    """A tool was defined or registered wrongly (duplicate name, bad schema)."""


class ProviderError(AgentError):
    """The model provider failed a request.

    `status_code` is the HTTP status when there was one, `code` the provider's error
    code (e.g. "invalid_api_key", "rate_limit_exceeded"), `provider_message` the
    provider's own words. `cause` names the root exception of a transport failure
    (e.g. "ConnectionRefusedError"); `provider` (the endpoint's host, never its
    credentials) and `model` are filled in by `agent.provider.Provider` for the request
    that failed.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        provider_message: str | None = None,
        cause: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.provider_message = provider_message if provider_message is not None else message
        self.cause = cause
        self.provider: str | None = None
        self.model: str | None = None

    def describe(self) -> str:
        """`ProviderUnavailable: couldn't connect to the provider: connection refused (...)`: for logs."""
        return f"{type(self).__name__}: {self.message}"

    def log_fields(self) -> dict[str, str | int]:
        """Where it failed, as log `extra=` fields (JSON keys; `key=value` in text logs)."""
        fields: dict[str, str | int] = {}
        if self.provider:
            fields["provider"] = self.provider
        if self.model:
            fields["model"] = self.model
        if self.status_code is not None:
            fields["status"] = self.status_code
        if self.cause:
            fields["cause"] = self.cause
        return fields


class ProviderAuthError(ProviderError):
    """401/403: the API key is wrong, revoked, or not allowed to use this model."""


class ProviderRateLimited(ProviderError):
    """429 after the SDK's own retries: slow down (`retry_after` seconds if the provider said)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class ProviderUnavailable(ProviderError):
    """The provider could not be reached, or the connection broke: try later.

    A refused connection, an unknown host, a TLS failure or a dropped connection. A
    provider that *answered* with an error is a `ProviderServerError` (a subclass, so
    code that only cares about "try later" may catch this class alone).
    """


class ProviderServerError(ProviderUnavailable):
    """The provider answered, with an error of its own: HTTP 5xx (but 504) or an error inside a 200.

    Told apart from an unreachable provider because the remedy differs: the network and
    `provider.base_url` are fine; the provider (or the model behind it) failed.
    """


class ProviderBadRequest(ProviderError):
    """4xx other than auth/rate limit (bad model name, context too long, bad parameter)."""


class ProviderNoVision(ProviderBadRequest):
    """The model refused a request because it carried images: it cannot take image input.

    Its own class because it is the one bad request a person can do something about
    (pick a model that sees, or send words instead), and because retrying the same
    request -- streaming or not -- can never succeed.
    """


class ProviderTimeout(ProviderError):
    """A request exceeded one of the configured clocks (connect, read, total)."""


class ProviderBadResponse(ProviderError):
    """The provider answered 200 but with something that is not a usable completion."""


class TranscriptionFailed(ProviderError):
    """Audio could not be turned into text (`Agent.transcribe`).

    One class for every cause, since the chat says one thing ("couldn't transcribe");
    `reason` keeps the cause for logs: "timeout", "auth", "rate_limited",
    "unavailable", "rejected" (a 4xx: bad format, too short) or "bad_response".
    """

    def __init__(self, message: str, *, reason: str, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.reason = reason
