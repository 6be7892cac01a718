"""An example of your own tools for parley: put the file where Python can import it (or
next to parley.yaml) and name it in the config:

    tools:
      modules: [weather_tools]
      policy:
        get_weather: {allow: user}              # default for your tools: admins only
        convert_temperature: {allow: user}

Every module-level function decorated with `@tool` is offered to the model. The schema
comes from the type hints (`Annotated[..., "text"]` describes a parameter, `Literal`
makes an enum, a default makes it optional), the description from the docstring.
`async def` tools are awaited; plain functions run in a worker thread, so a blocking
call never stalls the chats. Whatever a tool returns goes to the model (text as is,
anything else as JSON); an exception becomes an error the model can read, and the chat
shows one short line ("❌ get_weather: ...").

This file is tested (tests/test_tool_modules.py); it answers from a table instead of a
weather service, so it runs anywhere.
"""

from __future__ import annotations

from typing import Annotated, Literal

from agent import tool

_WEATHER = {"paris": (18.0, "sunny"), "oslo": (4.0, "snow"), "lima": (22.0, "cloudy")}


@tool(timeout=10)
async def get_weather(
    city: Annotated[str, "City name, e.g. Paris"],
    unit: Literal["C", "F"] = "C",
) -> str:
    """Current weather for a city."""
    found = _WEATHER.get(city.strip().lower())
    if found is None:
        raise ValueError(f"no weather known for {city!r}; try Paris, Oslo or Lima")
    celsius, sky = found
    value = celsius if unit == "C" else celsius * 9 / 5 + 32
    return f"{value:g} °{unit} and {sky} in {city.strip().title()}"


@tool
def convert_temperature(value: float, to: Literal["C", "F"]) -> dict[str, float | str]:
    """Convert a temperature between Celsius and Fahrenheit (a sync tool: runs in a thread)."""
    converted = value * 9 / 5 + 32 if to == "F" else (value - 32) * 5 / 9
    return {"value": round(converted, 2), "unit": to}
