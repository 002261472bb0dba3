"""The OpenAI chat-completions protocol: validate a request body into a `ChatRequest`, shape errors
the way OpenAI does, split a reasoning reply into `reasoning_content` and `content`. No Ray here.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import time
import uuid
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """A request the server refuses: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_tokens: int = 512  # the most new tokens one request may ask for
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    allow_remote_images: bool = False


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # {"role", "content": str with <image> markers}
    images: list[bytes] = field(default_factory=list)  # in the order of the <image> markers
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a number, got {value!r}", param=name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"'{name}' must be in {interval}, got {value}", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {value!r}", param=name)
    if value < low or (high is not None and value > high):
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return value


def decode_image(url: str, limits: Limits, param: str) -> bytes:
    """The bytes of an `image_url`: a base64 data URL (checked to be an image within the limits)."""
    from minimind.vision import ImageError, load_image

    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError(400, "remote image URLs are disabled on this server; send the image as a data: URL", param=param)
        data = _fetch(url, limits, param)
    else:
        match = re.fullmatch(r"data:(image/[\w.+-]+)?;base64,(.*)", url, re.DOTALL)
        if not match:
            raise APIError(400, "image_url.url must be a data:image/...;base64,... URL", param=param)
        if len(match.group(2)) * 3 // 4 > limits.max_image_bytes:
            raise APIError(413, f"image larger than {limits.max_image_bytes} bytes", param=param, code="image_too_large")
        try:
            data = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image_url.url is not valid base64", param=param) from None
    try:
        load_image(io.BytesIO(data), max_pixels=limits.max_image_pixels, name="the image")
    except ImageError as error:
        if "too large" in str(error):
            raise APIError(413, f"image over {limits.max_image_pixels} pixels", param=param, code="image_too_large") from None
        raise APIError(400, f"{error}", param=param) from None
    return data


def _fetch(url: str, limits: Limits, param: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            data = response.read(limits.max_image_bytes + 1)
    except OSError as error:
        raise APIError(400, f"could not fetch {url}: {error}", param=param) from None
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"image larger than {limits.max_image_bytes} bytes", param=param, code="image_too_large")
    return data


def parse_chat_request(body, models: dict[str, bool], limits: Limits, image_marker: str = "<image>") -> ChatRequest:
    """Validate an OpenAI chat-completions body. `models` maps each served model name to whether it
    takes images. Raises APIError with the status OpenAI would use."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model")
    if model not in models:
        raise APIError(404, f"the model '{model}' does not exist; served: {', '.join(sorted(models))}", param="model",
                       code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    parsed, images = [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = ""
            for part_index, part in enumerate(content):
                part_where = f"{where}.content[{part_index}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text += part["text"]
                elif kind == "image_url":
                    if not models[model]:
                        raise APIError(400, f"the model '{model}' does not take images", param=part_where)
                    url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else part.get("image_url")
                    if not isinstance(url, str):
                        raise APIError(400, f"{part_where}.image_url.url is required", param=part_where)
                    images.append(decode_image(url, limits, part_where))
                    text += image_marker + "\n"
                else:
                    raise APIError(400, f"{part_where} must be a text or image_url part", param=part_where)
        else:
            raise APIError(400, f"{where}.content must be a string or an array of parts", param=f"{where}.content")
        parsed.append({"role": role, "content": text})
    if parsed[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be the assistant's: there is nothing to reply to", param="messages")
    if len(images) > limits.max_images:
        raise APIError(400, f"at most {limits.max_images} images per request", param="messages")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a string or an array of up to 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        model=model, messages=parsed, images=images,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        max_tokens=_integer({"max_tokens": max_tokens}, "max_tokens", 1, limits.max_tokens),
        stop=stop or [], seed=_integer(body, "seed", 0, 2**63 - 1), stream=stream,
    )


def split_reasoning(text: str, think: tuple[str, str], answer: tuple[str, str]) -> tuple[str, str]:
    """A reply "<think>\\nR\\n</think>\\n<answer>\\nA\\n</answer>" -> (R, A); works on a partial reply
    too (the part so far). A reply without the think tag is all content."""
    stripped = text.lstrip()
    if stripped and think[0].startswith(stripped):
        return "", ""  # maybe the think tag arriving
    if not stripped.startswith(think[0]):
        return "", text
    body = stripped[len(think[0]):]
    reasoning, closed, rest = body.partition(think[1])
    if not closed:
        return _hold_back(reasoning.lstrip("\n"), think[1]), ""
    rest = rest.lstrip("\n")
    if answer[0].startswith(rest):
        return reasoning.strip("\n"), ""  # maybe the answer tag arriving
    if rest.startswith(answer[0]):
        rest = rest[len(answer[0]):].lstrip("\n")
    content = rest.split(answer[1])[0] if answer[1] in rest else _hold_back(rest, answer[1])
    return reasoning.strip("\n"), content.rstrip("\n") if answer[1] in rest else content


def _hold_back(text: str, marker: str) -> str:
    """Drop a trailing prefix of `marker` (and a newline before it) that may be the marker arriving."""
    for size in range(min(len(marker), len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return text[:-size].rstrip("\n")
    return text.rstrip("\n")


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())
