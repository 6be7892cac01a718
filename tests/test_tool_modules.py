"""Your own tools: `tools.modules`, the `parley.tools` entry points, and the example file."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from agent import ToolCall, ToolRegistry
from agent.errors import ToolError
from agent.tools.plugins import entry_point_tools, module_tools
from tests.fakes.llm import FakeLLM, Reply
from tests.support.process import run_cli, write_config
from tests.support.stack import parley_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "weather_tools.py"


async def test_the_example_module_gives_its_tools_with_schemas(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "weather_tools_a.py")
    tools = module_tools(["weather_tools_a"], search=[tmp_path])
    assert [t.name for t in tools] == ["get_weather", "convert_temperature"]
    assert {t.source for t in tools} == {"module:weather_tools_a"}
    weather = tools[0].parameters
    assert weather["required"] == ["city"]
    assert weather["properties"]["unit"] == {"enum": ["C", "F"], "type": "string"}
    assert weather["properties"]["city"]["description"] == "City name, e.g. Paris"
    registry = ToolRegistry(tools)
    ok = await registry.run(ToolCall("1", "get_weather", '{"city": "oslo", "unit": "F"}'))
    assert ok.content == "39.2 °F and snow in Oslo" and not ok.is_error
    converted = await registry.run(ToolCall("2", "convert_temperature", '{"value": 100, "to": "C"}'))
    assert converted.content == '{"value": 37.78, "unit": "C"}'
    unknown = await registry.run(ToolCall("3", "get_weather", '{"city": "Atlantis"}'))
    assert unknown.is_error and "no weather known for 'Atlantis'" in unknown.content


def test_a_module_that_cannot_load_is_named(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="module no_such_tools_module was not found"):
        module_tools(["no_such_tools_module"], search=[tmp_path])
    (tmp_path / "needs_missing.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(ToolError, match="module needs_missing could not be imported: No module named 'not_installed"):
        module_tools(["needs_missing"], search=[tmp_path])
    (tmp_path / "syntax_bad.py").write_text("def (:\n")
    with pytest.raises(ToolError, match="module syntax_bad failed to import: SyntaxError"):
        module_tools(["syntax_bad"], search=[tmp_path])
    (tmp_path / "no_tools_here.py").write_text("X = 1\n")
    with pytest.raises(ToolError, match="defines no tools"):
        module_tools(["no_tools_here"], search=[tmp_path])


def _install_entry_point(site: Path, module: str, body: str) -> None:
    """A minimal installed distribution declaring a `parley.tools` entry point."""
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    dist = site / f"{module}_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[parley.tools]\n{module} = {module}\n")


def test_entry_points_add_tools_and_a_broken_one_is_skipped(tmp_path: Path, monkeypatch, caplog) -> None:
    _install_entry_point(tmp_path, "ep_dice", '''
        from agent import tool

        @tool
        async def roll_dice(sides: int = 6) -> int:
            """Roll a die."""
            return 4
    ''')
    _install_entry_point(tmp_path, "ep_broken", "raise RuntimeError('broken package')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tools = entry_point_tools()
    assert [t.name for t in tools] == ["roll_dice"]
    assert tools[0].source == "module:ep_dice"
    assert "entry point ep_broken (ep_broken) gave no tools: RuntimeError: broken package" in caplog.text


async def test_parley_offers_a_module_tool_next_to_its_config(tmp_path: Path, fake_llm: FakeLLM) -> None:
    shutil.copy(EXAMPLE, tmp_path / "weather_tools.py")
    overrides = {"tools": {"modules": ["weather_tools"], "entry_points": False}}
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm, overrides=overrides))
    fake_llm.script(Reply.tool_calls([("get_weather", {"city": "Paris"})]), Reply.text("Sunny."))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = await run_cli(["chat", "--config", str(path)], cwd=workdir, stdin=b"weather in paris?\n")
    assert result.returncode == 0, result.output
    assert result.stdout == "Sunny.\n"
    first, second = fake_llm.requests
    names = [t["function"]["name"] for t in first.body["tools"]]
    assert names == ["current_time", "get_weather", "convert_temperature"]  # the console's user is an owner
    assert second.messages[-1]["content"] == "18 °C and sunny in Paris"


async def test_a_missing_module_stops_parley_with_one_clear_line(tmp_path: Path, fake_llm: FakeLLM) -> None:
    overrides = {"tools": {"modules": ["not_a_tools_module"]}}
    path = write_config(tmp_path, parley_config(tmp_path, fake_llm, overrides=overrides))
    result = await run_cli(["chat", "--config", str(path)], cwd=tmp_path, stdin=b"hi\n")
    assert result.returncode != 0
    assert "tools: module not_a_tools_module was not found" in result.stderr
    assert "Traceback" not in result.output
    assert fake_llm.requests == []
