"""The OpenAI chat-completions protocol: validate a request body into a `ChatRequest`, shape errors
the way OpenAI does, split a reasoning reply into `reasoning_content` and `content`. No Ray here.

Everything a client sends is bounded (`Limits`) and refused with OpenAI's error shape: the body's
bytes, its JSON (nesting, encoding), the characters per message and in all, the number of messages
and images, each image's bytes, format (PNG, JPEG, WebP, GIF only: Pillow's other parsers never see
client bytes), pixels and aspect ratio (checked from the header, before anything is decoded) and whole
decoding (`open_image`: the model replica decodes it with the same code, so an image passed here does not
fail there). What the server does not implement (`n` other than 1, logprobs, a JSON response format,
presence and frequency penalties, ...) is refused, never silently ignored.

Tools as OpenAI has them: `tools` (functions), `tool_choice` ("auto", "none", "required", or one function),
assistant messages with `tool_calls`, `tool` messages with the results. A reply's calls are read back by
`split_calls`; a call that does not parse leaves the whole reply as content.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field

from minimind.data.images import ImageError, ImageOutOfShape, ImageTooLarge, UnknownImageFormat, load_image
from minimind.data.tools import CALL_START, CallNotParsed, check_calls, check_result, check_tools, parse_calls, tool_names
from minimind.serve.errors import APIError
from minimind.serve.fetch import fetch_image

ROLES = ("system", "user", "assistant", "tool")
# OpenAI fields this server does not implement, with the values that ask for nothing (clients send some of
# them by default): any other value is refused, since a 200 that ignored it would be a wrong answer
NOT_IMPLEMENTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
                   "functions": (None, []), "function_call": (None, "none", "auto"),
                   "response_format": (None, {"type": "text"}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                   "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,)}
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # an animated GIF or WebP counts by its first frame
MAX_IMAGE_ASPECT_RATIO = 20  # long side / short side: a 224-pixel short side makes a long side of at most 4480


@dataclass
class Limits:
    max_tokens: int = 512  # the most new tokens one request may ask for
    max_body_bytes: int = 48 * 1024 * 1024  # room for max_images base64 images of max_image_bytes (4/3 each)
    max_messages: int = 512
    max_message_chars: int = 32_768
    max_total_chars: int = 65_536  # tokenizing is the replica's work: bounded long before the context check
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    allow_remote_images: bool = False
    remote_image_timeout_s: float = 10.0  # the whole fetch: name lookup, connect, every byte


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # {"role", "content": str with <image> markers}
    images: list[bytes] = field(default_factory=list)  # in the order of the <image> markers
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens already in the prompt or reply
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    tools: list[dict] | None = None  # functions, in OpenAI's shape
    thinking: bool | None = None  # chat_template_kwargs' enable_thinking/open_thinking; None: the model's default
    tool_choice: str = "auto"  # "auto", "none", "required", or the name of the one function to call

    def prompt_tools(self) -> list[dict] | None:
        """The tools the prompt lists: none when the client asked for no call."""
        return self.tools if self.tool_choice != "none" else None

    def forced_call(self) -> str:
        """What the reply must start with: a call ("required"), a call of one function, or nothing."""
        if self.tools is None or self.tool_choice in ("auto", "none"):
            return ""
        if self.tool_choice == "required":
            return CALL_START + "\n"
        # up to the colon: the space after it starts the next pre-token (` {"`), which the model writes itself
        return CALL_START + '\n{"name": ' + json.dumps(self.tool_choice, ensure_ascii=False) + ', "arguments":'

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty, "seed": self.seed}


def read_json(raw: bytes):
    """The JSON value of a request body: strict UTF-8, any nesting depth refused as a 400, not a crash."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the body is not valid UTF-8") from None
    except RecursionError:
        raise APIError(400, "the body is not valid JSON: nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, or an integer of more than 4300 digits
        raise APIError(400, f"the body is not valid JSON: {str(error)[:200]}") from None


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a number, got {_show(value)}", param=name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"'{name}' must be in {interval}, got {value}", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {_show(value)}", param=name)
    if value < low or (high is not None and value > high):
        raise APIError(400, f"'{name}' must be between {low} and {high}, got {_show(value)}", param=name)
    return value


def _show(value) -> str:
    """A client's value in an error message, cut short: an error must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: str, where: str) -> str:
    """Text the tokenizer can take: no lone surrogates (JSON allows "\\ud800"), no NUL characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{where} is not valid Unicode (a lone surrogate)", param=where) from None
    if "\0" in value:
        raise APIError(400, f"{where} contains a NUL character", param=where)
    return value


def decode_image(url: str, limits: Limits, param: str) -> bytes:
    """The bytes of an `image_url`: a base64 data URL, or an http(s) URL when the server allows remote
    images; checked to be a PNG, JPEG, WebP or GIF within the limits."""
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError(400, "remote image URLs are disabled on this server; send the image as a data: URL", param=param)
        data = fetch_image(url, limits.max_image_bytes, limits.remote_image_timeout_s, param)
    else:
        match = re.fullmatch(r"data:(image/[\w.+-]+)?;base64,(.*)", url, re.DOTALL)
        if not match:
            raise APIError(400, "image_url.url must be a data:image/...;base64,... URL" +
                           (" or an http(s) URL" if limits.allow_remote_images else ""), param=param)
        if len(match.group(2)) * 3 // 4 > limits.max_image_bytes:
            raise APIError(413, f"image larger than {limits.max_image_bytes} bytes", param=param, code="image_too_large")
        try:
            data = base64.b64decode(match.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image_url.url is not valid base64", param=param) from None
    check_image(data, limits.max_image_pixels, param)
    return data


def open_image(data: bytes, max_pixels: int, param: str):
    """A client's image as the model sees it (RGB, EXIF orientation applied): the one decode path of the
    gateway's check and the model replica. Refused: what is not a whole PNG, JPEG, WebP or GIF (no other
    Pillow parser, such as EPS's, which runs Ghostscript, ever sees client bytes), more than `max_pixels`
    (read from the header, before any pixel is decoded), or a long side more than MAX_IMAGE_ASPECT_RATIO
    times the short one (the processor would scale it up by as much)."""
    try:
        return load_image(
            io.BytesIO(data), max_pixels, name="the image", formats=IMAGE_FORMATS, max_aspect_ratio=MAX_IMAGE_ASPECT_RATIO
        )
    except ImageTooLarge:
        raise APIError(413, f"image over {max_pixels} pixels", param=param, code="image_too_large") from None
    except ImageOutOfShape as error:
        raise APIError(400, str(error), param=param, code="invalid_image") from None
    except UnknownImageFormat:
        raise APIError(
            400, "the image is not a readable image: send a PNG, JPEG, WebP or GIF", param=param, code="invalid_image"
        ) from None
    except ImageError:  # its message may quote Pillow's: not for the client
        raise APIError(
            400, "the image is not a readable image (corrupt or truncated)", param=param, code="invalid_image"
        ) from None


def check_image(data: bytes, max_pixels: int, param: str) -> None:
    """Refuse (APIError) an image the model replica could not use: `open_image`, its result dropped."""
    open_image(data, max_pixels, param).close()


def parse_chat_request(body, models: dict[str, bool], limits: Limits, image_marker: str = "<image>") -> ChatRequest:
    """Validate an OpenAI chat-completions body. `models` maps each served model name to whether it
    takes images. Raises APIError with the status OpenAI would use."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model")
    if model not in models:
        raise APIError(
            404,
            f"the model {_show(model)} does not exist; served: {', '.join(sorted(models))}",
            param="model",
            code="model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(413, f"at most {limits.max_messages} messages per request", param="messages", code="too_many_messages")
    tools, tool_choice = _tools(body)
    parsed, images, total = [], [], 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}", param=f"{where}.role")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            text = ""
        elif isinstance(content, str):
            text = _text(content, f"{where}.content")
        elif isinstance(content, list):
            text = ""
            for part_index, part in enumerate(content):
                part_where = f"{where}.content[{part_index}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text += _text(part["text"], f"{part_where}.text")
                elif kind == "image_url":
                    if not models[model]:
                        raise APIError(400, f"the model '{model}' does not take images", param=part_where)
                    if len(images) == limits.max_images:  # refused before the next one is decoded
                        raise APIError(400, f"at most {limits.max_images} images per request", param=part_where)
                    url = (
                        (part.get("image_url") or {}).get("url")
                        if isinstance(part.get("image_url"), dict)
                        else part.get("image_url")
                    )
                    if not isinstance(url, str):
                        raise APIError(400, f"{part_where}.image_url.url is required", param=part_where)
                    images.append(decode_image(url, limits, part_where))
                    text += image_marker + "\n"
                else:
                    raise APIError(400, f"{part_where} must be a text or image_url part", param=part_where)
                if len(text) > limits.max_message_chars:
                    break
        else:
            raise APIError(400, f"{where}.content must be a string or an array of parts", param=f"{where}.content")
        if len(text) > limits.max_message_chars:
            raise APIError(
                413, f"{where} is longer than {limits.max_message_chars} characters", param=where, code="message_too_long"
            )
        total += len(text)
        if total > limits.max_total_chars:
            raise APIError(
                413,
                f"the messages are longer than {limits.max_total_chars} characters in all",
                param="messages",
                code="messages_too_long",
            )
        parsed.append({"role": role, "content": text, **_tool_fields(message, where, tools, parsed)})
    if parsed[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be the assistant's: there is nothing to reply to", param="messages")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a string or an array of up to 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise APIError(400, "'stream_options' must be an object like {\"include_usage\": true}", param="stream_options")
    for name, off in NOT_IMPLEMENTED.items():
        if body.get(name) not in off:
            raise APIError(400, f"'{name}' is not supported by this server (got {_show(body[name])})", param=name)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        # n samples would take n batch rows (n prefills, n KV caches) for one queue slot and one request's
        # bounds; n requests cost the same, decode in the same batch, and are bounded and queued one by one
        raise APIError(
            400, f"'n' must be 1: this server returns one choice per request (send several requests), got {_show(n)}", param="n"
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        model=model,
        messages=parsed,
        images=images,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 2**31 - 1) or 0,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 2.0, low_open=True),
        max_tokens=_integer({"max_tokens": max_tokens}, "max_tokens", 1, limits.max_tokens),
        stop=[_text(s, "stop") for s in stop or []],
        seed=_integer(body, "seed", 0, 2**63 - 1),
        stream=stream,
        include_usage=bool((options or {}).get("include_usage")),
        tools=tools,
        tool_choice=tool_choice,
        thinking=_thinking(body),
    )


def _thinking(body: dict) -> bool | None:
    """`chat_template_kwargs: {"enable_thinking": true}` (vLLM's and Qwen3's name; minimind-3's `open_thinking`
    too): whether the prompt opens a think block, in templates that have one."""
    options = body.get("chat_template_kwargs")
    if options is None:
        return None
    if not isinstance(options, dict) or set(options) - {"enable_thinking", "open_thinking"}:
        raise APIError(400, "'chat_template_kwargs' takes only enable_thinking (or open_thinking), a boolean",
                       param="chat_template_kwargs")
    values = set(options.values())
    if not values <= {True, False} or len(values) > 1 or any(not isinstance(v, bool) for v in options.values()):
        raise APIError(400, "'chat_template_kwargs' enable_thinking must be one boolean", param="chat_template_kwargs")
    return values.pop() if values else None


def _tools(body: dict) -> tuple[list[dict] | None, str]:
    """The request's `tools` and `tool_choice`, checked."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise APIError(400, "'tools' must be an array of functions", param="tools")
        try:
            tools = check_tools(tools) or None
        except ValueError as error:
            raise APIError(400, str(error), param="tools") from None
    if choice is None or choice in ("auto", "none"):
        return tools, choice or "auto"
    if tools is None:
        raise APIError(400, f"'tool_choice' {_show(choice)} needs 'tools'", param="tool_choice")
    if choice == "required":
        return tools, choice
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if name not in tool_names(tools):
        raise APIError(400, "'tool_choice' must be auto, none, required or {\"type\": \"function\", \"function\": "
                       f"{{\"name\": ...}}}} naming one of the tools, got {_show(choice)}", param="tool_choice")
    return tools, name


def _tool_fields(message: dict, where: str, tools: list[dict] | None, before: list[dict]) -> dict:
    """An assistant message's calls (their arguments as objects) or a tool message's answer, checked."""
    try:
        if message["role"] == "assistant" and message.get("tool_calls") is not None:
            return {"tool_calls": check_calls(message["tool_calls"], where, tool_names(tools))}
        if message["role"] == "tool":
            check_result(message, where, before)
    except ValueError as error:
        raise APIError(400, str(error), param=where) from None
    return {}


def parse_chat_body(raw: bytes, models: dict[str, bool], limits: Limits) -> ChatRequest:
    """`parse_chat_request` of a raw body: the CPU work the gateway keeps off its event loop."""
    return parse_chat_request(read_json(raw), models, limits)


def split_reasoning(text: str, think: tuple[str, str], answer: tuple[str, str], final: bool = False) -> tuple[str, str]:
    """A reply "<think>\\nR\\n</think>\\n<answer>\\nA\\n</answer>" -> (R, A), or with no answer tags
    (minimind-3: `answer` is ("", "")) "<think>\\nR\\n</think>\\n\\nA" -> (R, A); works on a partial reply
    too (the part so far), holding back what may be a tag arriving (`final`: the reply is over, nothing is
    arriving). A reply without the think tag is all content; whitespace before the think tag is neither."""
    stripped = text.lstrip()
    if not final and think[0].startswith(stripped):
        return "", ""  # nothing yet, whitespace, or maybe the think tag arriving
    if not stripped.startswith(think[0]):
        return "", text
    body = stripped[len(think[0]) :]
    reasoning, closed, rest = body.partition(think[1])
    if not closed:
        return _hold_back(reasoning.lstrip("\n"), think[1], final), ""
    rest = rest.lstrip("\n")
    if not (answer[0] and answer[1]):
        return reasoning.strip("\n"), rest.rstrip("\n")  # trailing newlines held back: maybe the reply's end
    if not final and answer[0].startswith(rest):
        return reasoning.strip("\n"), ""  # maybe the answer tag arriving
    if rest.startswith(answer[0]):
        rest = rest[len(answer[0]) :].lstrip("\n")
    content = rest.split(answer[1])[0] if answer[1] in rest else _hold_back(rest, answer[1], final)
    return reasoning.strip("\n"), content.rstrip("\n") if answer[1] in rest else content


def split_calls(content: str, final: bool = False) -> tuple[str, list[dict] | None]:
    """The content of a reply that may call tools, as far as it can be released, and its calls once it is
    over (`final`): the text before the first <tool_call> (a tag arriving held back), then at the end the
    calls, or, when they do not parse, the whole reply as content (None: no calls)."""
    start = content.find(CALL_START)
    if not final:
        return (_hold_back(content, CALL_START) if start < 0 else content[:start].rstrip("\n")), None
    if start < 0:
        return content, None
    try:
        before, calls = parse_calls(content)
    except CallNotParsed:
        return content, None
    return before, calls


def _hold_back(text: str, marker: str, final: bool = False) -> str:
    """Drop a trailing prefix of `marker` (and a newline before it) that may be the marker arriving."""
    for size in range(0 if final else min(len(marker), len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return text[:-size].rstrip("\n")
    return text.rstrip("\n")


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())
