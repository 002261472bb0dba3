"""The demo world's tools, which answer what the demo model cannot know: the sum of two four-digit numbers, and
a city's weather on a given day. Their definitions are a JSON file (`tools.json`), so that Serve's gateway hands
them to the chat page without importing the demo world; the page runs them in the browser (the same formulas),
Python runs them here."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

TOOLS_FILE = Path(__file__).with_name("tools.json")
SKIES = ("晴", "多云", "阴", "小雨")
EPOCH = datetime.date(1970, 1, 1)


def demo_tools() -> list[dict]:
    return json.loads(TOOLS_FILE.read_text(encoding="utf-8"))


def weather(city: str, day: datetime.date) -> str:
    """A made-up but steady forecast: one sky and temperature per city and day (the chat page computes the same)."""
    mixed = (sum(map(ord, city)) * 31 + (day - EPOCH).days) % 100_000
    return f"{SKIES[mixed % len(SKIES)]}，{5 + mixed // len(SKIES) % 25}度"


def run_tool(name: str, arguments: dict, day: datetime.date | None = None) -> str:
    """A call's result as the tool message's text (the weather of `day`, today by default); a call the tools cannot
    run says why."""
    if name == "add":
        a, b = arguments.get("a"), arguments.get("b")
        if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and not isinstance(b, bool):
            return str(a + b)
        return 'error: add takes two integers, {"a": ..., "b": ...}'
    if name == "weather":
        city = arguments.get("city")
        if isinstance(city, str) and city.strip():
            return weather(city.strip(), day or datetime.datetime.now(datetime.timezone.utc).date())
        return 'error: weather takes a city, {"city": ...}'
    return f"error: no tool named {name!r}"
