"""The MiniMind tokenizer: byte-level BPE trained from scratch, carrying MiniMind2's chat template.

Every marker is one token with a fixed id: 0 `<unk>` (also padding), 1 `<s>`, 2 `</s>`, then `<think>`,
`</think>`, `<answer>`, `</answer>` and the image placeholder `<image>`. (MiniMind2's own tags split into
sub-tokens, so its x10 tag weight also hit pieces like `th` everywhere.)

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
    answer_start: str = "<answer>"
    answer_end: str = "</answer>"
    image: str = "<image>"

    @classmethod
    def of(cls, tokenizer) -> "Markers":
        """The markers a tokenizer declares in its config (`think_start`, ...), else the defaults."""
        stored = getattr(tokenizer, "init_kwargs", {}) or {}
        return cls(**{f.name: stored.get(f.name) or f.default for f in fields(cls)})

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
        """The token ids of <think>, </think>, <answer>, </answer> (one or more tokens each)."""
        return [self.sequence(tokenizer, name) for name in ("think_start", "think_end", "answer_start", "answer_end")]


SET_MARKERS = (
    'name an existing special token for it in the tokenizer\'s tokenizer_config.json (e.g. "image": "<|image_pad|>"), '
    "or import the model with `minimind import ... --markers image=<|image_pad|>`"
)


SPECIAL_TOKENS = [UNK, BOS, EOS, *(f.default for f in fields(Markers))]

# MiniMind2's ChatML variant: every turn is "<s>{role}\n{content}</s>\n"; a conversation without a
# system turn gets the default persona.
CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<s>system\\n" + DEFAULT_SYSTEM_PROMPT + "</s>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<s>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 6400,
    model_max_length: int = 32768,
    split_digits: bool = False,
    split_han: bool = False,
):
    """Train byte-level BPE on `texts`; returns a transformers fast tokenizer with the chat template.

    `split_digits`: every digit is its own token, so a number's digits line up with its place values
    (arithmetic then learns one rule per digit instead of one per digit group the merges happened to make).
    `split_han`: every Chinese character (and punctuation mark) is its own token. Without it BPE merges
    whole runs of characters, which on a small, repetitive corpus fuses a sentence's frame and its value
    ("最喜欢的颜色是红色" one token, "喜欢红色" another): each paraphrase of a fact is then a different
    token, and a small model learns the fact once per paraphrase instead of once."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    splits = [pre_tokenizers.Split(Regex(r"[\p{Han}\p{P}]"), "isolated")] if split_han else []
    splits += [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level]) if splits else byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is ever <unk>
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    markers = Markers()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        extra_special_tokens={f.name: getattr(markers, f.name) for f in fields(markers)},
    )


def load_tokenizer(directory: str | Path):
    """Load any fast tokenizer directory (ours or a user's own). Uses the fast-tokenizer class directly:
    AutoTokenizer would also parse a model directory's config.json as a transformers config."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory} has no tokenizer files (tokenizer.json)")
    return PreTrainedTokenizerFast.from_pretrained(str(directory))
