"""Tool calling's data: tool definitions and calls in OpenAI's shapes, checked and normalised, and the calls a
reply writes (minimind-3's format: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`) read back.

    tools = check_tools(record["tools"])          [{"type": "function", "function": {"name": ..., ...}}]
    calls = check_calls(message["tool_calls"], "conversations[2]", {"add"})
                                                  [{"id", "type": "function", "function": {"name", "arguments": {...}}}]
    content, calls = parse_calls(reply)           the text before the calls, and the calls ([] when none)

Arguments are kept as objects: the chat templates write them as JSON, OpenAI's clients send them as JSON text.
"""

from __future__ import annotations

import json
import re

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_START) + r"\s*(.*?)\s*" + re.escape(CALL_END), re.DOTALL)


class CallNotParsed(ValueError):
    """A reply's <tool_call> block that is not a JSON object with a name and object arguments."""


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not JSON ({error.msg} at character {error.pos})") from None


def check_tools(tools) -> list[dict]:
    """A list of function tools (or its JSON text), each as {"type": "function", "function": {"name", ...}}
    or a bare {"name", ...}; returns them in OpenAI's shape."""
    if isinstance(tools, str):
        tools = _json(tools, '"tools"')
    if not isinstance(tools, list):
        raise ValueError('"tools" must be a list of functions')
    checked = []
    for index, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f'"tools"[{index}] needs a function with a "name"')
        if tool.get("type", "function") != "function":
            raise ValueError(f'"tools"[{index}] has type {tool["type"]!r}; only functions are tools here')
        checked.append({"type": "function", "function": function})
    return checked


def tool_names(tools: list[dict] | None) -> set[str] | None:
    return None if tools is None else {tool["function"]["name"] for tool in tools}


def check_calls(calls, where: str, names: set[str] | None) -> list[dict]:
    """An assistant message's `tool_calls`: each {"id", "type", "function": {"name", "arguments"}} (arguments
    a JSON object or its text) or a bare {"name", "arguments"}; `names`: the tools it may call (None: any)."""
    if not isinstance(calls, list) or not calls:
        raise ValueError(f'{where} "tool_calls" must be a non-empty list')
    checked = []
    for index, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f'{where} tool call {index} needs a function "name"')
        name, arguments = function["name"], function.get("arguments", {})
        if names is not None and name not in names:
            known = ", ".join(sorted(names)) or "none"
            raise ValueError(f"{where} calls the unknown tool {name!r} (the tools given: {known})")
        if isinstance(arguments, str):
            arguments = _json(arguments, f"{where} the arguments of the call of {name!r}")
        if not isinstance(arguments, dict):
            raise ValueError(f"{where} the arguments of the call of {name!r} are not a JSON object")
        checked.append({"id": call.get("id") or f"call_{index}", "type": "function",
                        "function": {"name": name, "arguments": arguments}})
    return checked


def check_result(message: dict, where: str, before: list[dict]) -> None:
    """A `tool` message after the (checked) messages `before`: it answers a call of the last assistant message,
    with only tool results between them, and names one of its calls when it names one (`tool_call_id`)."""
    previous = next((m for m in reversed(before) if m["role"] != "tool"), None)
    calls = previous.get("tool_calls") if previous and previous["role"] == "assistant" else None
    if not calls:
        raise ValueError(f"{where} is a tool result with no tool call before it")
    call_id = message.get("tool_call_id")
    if call_id is not None and call_id not in {call["id"] for call in calls}:
        raise ValueError(f"{where} answers the tool call {call_id!r}, which the call before it does not make")


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """(the reply's text before its first call, the calls it writes: {"name", "arguments": dict}). Raises
    CallNotParsed for a call block that is not a JSON object with a string name and object arguments, or
    text between or after the calls."""
    first = text.find(CALL_START)
    if first < 0:
        return text, []
    content, calls, end = text[:first].rstrip("\n"), [], first
    for match in _CALL.finditer(text, first):
        if text[end : match.start()].strip():
            raise CallNotParsed("text between tool calls")
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError as error:
            raise CallNotParsed(f"a tool call is not JSON ({error.msg})") from None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments", {}), dict)):
            raise CallNotParsed('a tool call is not {"name": ..., "arguments": {...}}')
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
        end = match.end()
    if not calls or text[end:].strip():
        raise CallNotParsed("an unclosed tool call, or text after the calls")
    return content, calls
