"""The MiniMind tokenizer: byte-level BPE trained from scratch, carrying MiniMind2's chat template.

Every marker is one token with a fixed id: 0 `<unk>` (also padding), 1 `<s>`, 2 `</s>`, then `<think>`,
`</think>`, `<answer>`, `</answer>` and the image placeholder `<image>`. (MiniMind2's own tags split into
sub-tokens, so its x10 tag weight also hit pieces like `th` everywhere.)

Other code never spells a marker: it asks `Markers.of(tokenizer)`, which reads the names stored in the
tokenizer's config, so a user's own tokenizer (say, with `<|im_start|>` markers) works unchanged.
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

    def ids(self, tokenizer) -> dict[str, int]:
        """Marker name -> token id; a marker that is not a single token of `tokenizer` is an error."""
        vocab = tokenizer.get_vocab()
        missing = [getattr(self, f.name) for f in fields(self) if getattr(self, f.name) not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no single token for {missing}; add them as special tokens or set their names in tokenizer_config.json")
        return {f.name: vocab[getattr(self, f.name)] for f in fields(self)}

    def tag_ids(self, tokenizer) -> list[int]:
        ids = self.ids(tokenizer)
        return [ids["think_start"], ids["think_end"], ids["answer_start"], ids["answer_end"]]


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


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6400, model_max_length: int = 32768):
    """Train byte-level BPE on `texts`; returns a transformers fast tokenizer with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=UNK,
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
