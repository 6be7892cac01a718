"""parley's agent core: run one streaming turn against any OpenAI-compatible provider.

    from agent import Agent, ProviderConfig, Timeouts, ToolRegistry

    agent = Agent(ProviderConfig(base_url=..., api_key=..., model="gpt-4.1-mini"))
    result = await agent.run_turn(history, "hello", events)

The package never imports `bots/`; everything a chat shows comes through `TurnEvents`.
"""

from __future__ import annotations

from .config import ProviderConfig, Timeouts
from .errors import (
    AgentError,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderBadResponse,
    ProviderError,
    ProviderNoVision,
    ProviderRateLimited,
    ProviderServerError,
    ProviderTimeout,
    ProviderUnavailable,
    ToolError,
    TranscriptionFailed,
)
from .events import NullEvents, ToolCall, ToolResult, TurnEvents
from .provider import ProbeResult
from .media import TranscriptionConfig, UserContent, data_url, image_part, text_part
from .stream import ModelResponse, Usage
from .tools import Tool, ToolRegistry, tool
from .turn import MAX_STEPS_MESSAGE, Agent, TurnResult, UsageMeter

__all__ = [
    "MAX_STEPS_MESSAGE",
    "Agent",
    "AgentError",
    "ModelResponse",
    "NullEvents",
    "ProbeResult",
    "ProviderAuthError",
    "ProviderBadRequest",
    "ProviderBadResponse",
    "ProviderConfig",
    "ProviderError",
    "ProviderNoVision",
    "ProviderRateLimited",
    "ProviderServerError",
    "ProviderTimeout",
    "ProviderUnavailable",
    "Timeouts",
    "Tool",
    "ToolCall",
    "ToolError",
    "ToolRegistry",
    "ToolResult",
    "TranscriptionConfig",
    "TranscriptionFailed",
    "TurnEvents",
    "TurnResult",
    "Usage",
    "UserContent",
    "data_url",
    "image_part",
    "text_part",
    "UsageMeter",
    "tool",
]
