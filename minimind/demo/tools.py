"""The demo world's tools, which answer what the demo model cannot know. Their definitions are a JSON file
(`tools.json`), so that Serve's gateway hands them to the chat page without importing the demo world; the
page runs them in the browser, Python runs them here."""

from __future__ import annotations

import json
from pathlib import Path

TOOLS_FILE = Path(__file__).with_name("tools.json")


def demo_tools() -> list[dict]:
    return json.loads(TOOLS_FILE.read_text(encoding="utf-8"))


def run_tool(name: str, arguments: dict) -> str:
    """A call's result as the tool message's text; a call the tools cannot run says why."""
    if name == "add":
        a, b = arguments.get("a"), arguments.get("b")
        if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and not isinstance(b, bool):
            return str(a + b)
        return 'error: add takes two integers, {"a": ..., "b": ...}'
    return f"error: no tool named {name!r}"
