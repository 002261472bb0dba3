"""The MiniMind tokenizer: byte-level BPE trained from scratch, in one of two styles (`STYLES`).

    minimind2   0 `<unk>` (also padding), 1 `<s>`, 2 `</s>`, then `<think>`, `</think>`, `<answer>`,
                `</answer>` and the image placeholder `<image>`; MiniMind2's chat template. (MiniMind2's own
                tags split into sub-tokens, so its x10 tag weight also hit pieces like `th` everywhere.)
    minimind-3  minimind-3's 36 special tokens (0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`, 12
                `<|image_pad|>`, 21-24 tool calls and responses, 25 `<think>`, 26 `</think>`) and its
                Qwen3-style template: every assistant turn is `<think>\n{reasoning}\n</think>\n\n{reply}`.

Other code never spells a marker: it asks `Markers.of(tokenizer)`, which reads the names stored in the
tokenizer's config, so a user's own tokenizer (say, with `<|im_start|>` markers) works unchanged. Its
tags may be several tokens (MiniMind's own tokenizers spell `<think>` as `<`,`th`,`ink`,`>`): the
reasoning loss weights exactly the positions where a tag stands. Only a VLM's image placeholder must be
one token, and may be an existing one (`Markers.configure(tokenizer, {"image": "<|image_pad|>"})`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_SYSTEM_PROMPT = "你是 MiniMind，是一个有用的人工智能助手。"
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


@dataclass(frozen=True)
class Markers:
    """Tags with a meaning to the training stages, as token strings and ids of one tokenizer."""

    think_start: str = "<think>"
    think_end: str = "</think>"
    answer_start: str = "<answer>"  # "" (minimind-3): the answer is whatever follows </think>
    answer_end: str = "</answer>"
    image: str = "<image>"

    @classmethod
    def of(cls, tokenizer) -> "Markers":
        """The markers a tokenizer declares in its config (`think_start`, ...), else the defaults of its
        style: minimind-3's when its vocabulary has `<|im_start|>` and `<think>` but no `<answer>` token."""
        stored = getattr(tokenizer, "init_kwargs", {}) or {}
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        minimind3 = {"<|im_start|>", "<think>"} <= vocab.keys() and "<answer>" not in vocab
        defaults = MINIMIND3_MARKERS if minimind3 else cls()
        return cls(**{f.name: stored[f.name] if stored.get(f.name) is not None else getattr(defaults, f.name)
                      for f in fields(cls)})

    @property
    def has_answer_tags(self) -> bool:
        return bool(self.answer_start and self.answer_end)

    def reply_opening(self, generation_prompt: str) -> str:
        """The part of a rendered generation prompt that belongs to the reply: a think block the template
        opened ("<think>\n") or wrote empty ("<think>\n\n</think>\n\n"), which the parsers of replies
        need in front of the generated text. "" when the prompt ends without one."""
        start = generation_prompt.rfind(self.think_start)
        if start < 0:
            return ""
        opened = generation_prompt[start:]
        return opened if not opened[len(self.think_start) :].replace(self.think_end, "", 1).strip() else ""

    def reply_text(self, reasoning: str | None, answer: str) -> str:
        """A reply as this style's model writes it: MiniMind2's <think>/<answer> blocks, minimind-3's think
        block followed by the answer."""
        if reasoning is None:
            return answer
        if self.has_answer_tags:
            return f"{self.think_start}\n{reasoning}\n{self.think_end}\n{self.answer_start}\n{answer}\n{self.answer_end}"
        return f"{self.think_start}\n{reasoning}\n{self.think_end}\n\n{answer}"

    def split_reply(self, text: str) -> tuple[str | None, str]:
        """(reasoning, answer) of a reply in either style, leniently: text before a think block or after an
        answer block is dropped; no think block: (None, text)."""
        before, opened, rest = text.partition(self.think_start)
        reasoning, closed, after = rest.partition(self.think_end)
        if not (opened and closed):
            return None, text
        for start, end in ((self.answer_start, self.answer_end), (Markers.answer_start, Markers.answer_end)):
            if start and start in after:
                after = after.partition(start)[2].partition(end)[0]
                break
        return reasoning.strip("\n"), after.strip("\n")

    @classmethod
    def configure(cls, tokenizer, strings: dict[str, str]) -> "Markers":
        """Name the strings a tokenizer uses for some markers, e.g. {"image": "<|image_pad|>"}; stored in
        its config, so a model folder saved with it carries them to every stage and to Serve."""
        unknown = sorted(set(strings) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown marker(s) {unknown}; the markers are {[f.name for f in fields(cls)]}")
        tokenizer.init_kwargs.update(strings)
        return cls.of(tokenizer)

    def ids(self, tokenizer) -> dict[str, int]:
        """Marker name -> token id, for uses that need every marker to be one token."""
        vocab = tokenizer.get_vocab()
        missing = [getattr(self, f.name) for f in fields(self) if getattr(self, f.name) not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no single token for {missing}; " + SET_MARKERS)
        return {f.name: vocab[getattr(self, f.name)] for f in fields(self)}

    def image_id(self, tokenizer) -> int:
        """The image placeholder's token id: a VLM writes each image's features over its copies, so it must
        be one token."""
        token_id = tokenizer.get_vocab().get(self.image)
        if token_id is None:
            raise ValueError(f"the image placeholder {self.image!r} is not a single token of this tokenizer; " + SET_MARKERS)
        return token_id

    def sequence(self, tokenizer, name: str) -> list[int]:
        """A marker's token ids: its own id when it is a token, else how the tokenizer spells it."""
        marker = getattr(self, name)
        token_id = tokenizer.get_vocab().get(marker)
        return [token_id] if token_id is not None else list(tokenizer(marker, add_special_tokens=False)["input_ids"])

    def tag_sequences(self, tokenizer) -> list[list[int]]:
        """The token ids of <think>, </think>, <answer>, </answer> (one or more tokens each; minimind-3 has no
        answer tags)."""
        names = ("think_start", "think_end", "answer_start", "answer_end")
        return [self.sequence(tokenizer, name) for name in names if getattr(self, name)]


SET_MARKERS = (
    'name an existing special token for it in the tokenizer\'s tokenizer_config.json (e.g. "image": "<|image_pad|>"), '
    "or import the model with `minimind import ... --markers image=<|image_pad|>`"
)


SPECIAL_TOKENS = [UNK, BOS, EOS, *(f.default for f in fields(Markers))]

MINIMIND3_MARKERS = Markers(answer_start="", answer_end="", image="<|image_pad|>")
# minimind-3's ids 0-35, in Qwen's order: what the code relies on is looked up by name (Markers, bos/eos/pad)
MINIMIND3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    *(f"<|buffer{n}|>" for n in range(1, 10)),
]

# What a system turn says when a request lists tools: the tools as JSON lines inside <tools></tools>, and the
# form of a call. The wording of Qwen3's template, which minimind-3's models learned their tool calls with.
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_CALL_FORM = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def _chat_template(start: str, end: str, default_system: str | None, think: bool) -> str:
    """A ChatML template in one style: turns `{start}{role}\n{content}{end}\n`; `tools` listed in the system
    turn; an assistant turn's `tool_calls` written after its content, each as `<tool_call>\n{json}\n</tool_call>`;
    consecutive `tool` results in one user turn, each inside <tool_response></tool_response>. MiniMind2's
    (`default_system`: a conversation without a system turn gets the persona) writes replies as they are;
    minimind-3's (`think`) writes every reply after a think block, its reasoning from `reasoning_content` or
    split off an inline </think>, and its generation prompt writes an empty think block (a direct reply) or,
    with `open_thinking`, opens one."""
    def turn(role: str, content: str) -> str:  # a Jinja expression of one whole turn
        return f"'{start}' + {role} + '\\n' + {content} + '{end}\\n'"

    tools = (
        "(('' if not system else system + '\\n\\n') + '" + TOOLS_PREAMBLE.replace("\n", "\\n") + "'"
        " + tools_json + '" + TOOLS_CALL_FORM.replace("\n", "\\n").replace("'", "\\'") + "')"
    )
    parts = [
        "{%- set tools_json = namespace(text='') %}",
        "{%- for tool in tools or [] %}{%- set tools_json.text = tools_json.text + '\\n' + (tool | tojson) %}{%- endfor %}",
        "{%- set tools_json = tools_json.text %}",
        "{%- set first_is_system = messages and messages[0]['role'] == 'system' %}",
    ]
    if default_system is not None:
        parts.append("{%- if not first_is_system %}{%- set system = '" + default_system + "' %}"
                     "{{ " + turn("'system'", f"({tools} if tools else system)") + " }}{%- endif %}")
    else:
        parts.append("{%- if tools and not first_is_system %}{%- set system = '' %}"
                     "{{ " + turn("'system'", tools) + " }}{%- endif %}")
    parts += [
        "{%- for message in messages %}",
        "{%- set content = message['content'] if message['content'] is string else '' %}",
        "{%- if message['role'] == 'system' and loop.first and tools %}{%- set system = content %}",
        "{{ " + turn("'system'", tools) + " }}",
        "{%- elif message['role'] == 'assistant' %}",
    ]
    if think:
        parts += [
            "{%- set reasoning = message['reasoning_content'] if message['reasoning_content'] is string else '' %}",
            "{%- if not reasoning and '</think>' in content %}",
            "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}",
            "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}",
            "{%- endif %}",
            "{%- set content = '<think>\\n' + reasoning + '\\n</think>\\n\\n' + content %}",
        ]
    parts += [
        "{%- set reply = namespace(text=content) %}",  # a namespace: what a loop sets must outlive it
        "{%- for call in message['tool_calls'] or [] %}",
        "{%- set function = call['function'] if call['function'] is defined else call %}",
        "{%- set arguments = function['arguments'] if function['arguments'] is string else function['arguments'] | tojson %}",
        "{%- set reply.text = reply.text + ('\\n' if reply.text and not reply.text.endswith('\\n') else '')"
        " + '<tool_call>\\n{\"name\": ' + (function['name'] | tojson) + ', \"arguments\": ' + arguments + '}\\n</tool_call>' %}",
        "{%- endfor %}",
        "{{ " + turn("'assistant'", "reply.text") + " }}",
        "{%- elif message['role'] == 'tool' %}",
        "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '" + start + "user' }}{%- endif %}",
        "{{ '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}",
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '" + end + "\\n' }}{%- endif %}",
        "{%- else %}",
        "{{ " + turn("message['role']", "content") + " }}",
        "{%- endif %}",
        "{%- endfor %}",
    ]
    opening = "('<think>\\n' if open_thinking else '<think>\\n\\n</think>\\n\\n')" if think else "''"
    parts.append("{%- if add_generation_prompt %}{{ '" + start + "assistant\\n' + " + opening + " }}{%- endif %}")
    return "".join(parts)


# MiniMind2's ChatML variant: every turn is "<s>{role}\n{content}</s>\n"; a conversation without a
# system turn gets the default persona.
CHAT_TEMPLATE = _chat_template("<s>", "</s>", DEFAULT_SYSTEM_PROMPT, think=False)
# minimind-3's Qwen3-style ChatML: no default system turn, a think block in every reply.
MINIMIND3_CHAT_TEMPLATE = _chat_template("<|im_start|>", "<|im_end|>", None, think=True)


@dataclass(frozen=True)
class Style:
    special_tokens: list[str]
    bos: str
    eos: str
    pad: str  # also the unknown token
    chat_template: str
    markers: Markers


STYLES = {
    "minimind2": Style(SPECIAL_TOKENS, BOS, EOS, UNK, CHAT_TEMPLATE, Markers()),
    "minimind-3": Style(MINIMIND3_SPECIAL_TOKENS, "<|im_start|>", "<|im_end|>", "<|endoftext|>", MINIMIND3_CHAT_TEMPLATE,
                        MINIMIND3_MARKERS),
}


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 6400,
    model_max_length: int = 32768,
    split_digits: bool = False,
    split_han: bool = False,
    style: str = "minimind2",
):
    """Train byte-level BPE on `texts`; returns a transformers fast tokenizer with the special tokens and
    chat template of `style` (a key of `STYLES`).

    `split_digits`: every digit is its own token, so a number's digits line up with its place values
    (arithmetic then learns one rule per digit instead of one per digit group the merges happened to make).
    `split_han`: every Chinese character (and Chinese punctuation mark) is its own token. Without it BPE merges
    whole runs of characters, which on a small, repetitive corpus fuses a sentence's frame and its value
    ("最喜欢的颜色是红色" one token, "喜欢红色" another): each paraphrase of a fact is then a different
    token, and a small model learns the fact once per paraphrase instead of once. ASCII punctuation stays
    with byte-level BPE, which merges its runs: a tool call's `", "` is then a token or two, not four alike
    ones (the demo model, counting `"`, `,`, ` `, `"`, dropped a call's quote in half of its sums)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; choose one of {sorted(STYLES)}")
    chosen = STYLES[style]
    backend = Tokenizer(models.BPE(unk_token=chosen.pad))
    splits = [pre_tokenizers.Split(Regex(r"[\p{Han}[\p{P}&&[^\x00-\x7F]]]"), "isolated")] if split_han else []
    splits += [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level]) if splits else byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=chosen.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is ever <unk>
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    markers = chosen.markers
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=chosen.bos,
        eos_token=chosen.eos,
        unk_token=chosen.pad,
        pad_token=chosen.pad,
        chat_template=chosen.chat_template,
        model_max_length=model_max_length,
        extra_special_tokens={f.name: getattr(markers, f.name) for f in fields(markers) if getattr(markers, f.name)},
    )


def opens_thinking(tokenizer) -> bool:
    """Whether prompts open a think block by default: `"open_thinking": true` in a tokenizer's config. Without
    it they write an empty one (minimind-3's default: thinking is asked for, per prompt); MiniMind2's template
    ignores it."""
    return bool((getattr(tokenizer, "init_kwargs", None) or {}).get("open_thinking"))


def load_tokenizer(directory: str | Path):
    """Load any fast tokenizer directory (ours or a user's own). Uses the fast-tokenizer class directly:
    AutoTokenizer would also parse a model directory's config.json as a transformers config."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory} has no tokenizer files (tokenizer.json)")
    return PreTrainedTokenizerFast.from_pretrained(str(directory))
