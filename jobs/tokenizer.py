"""Train the byte-level BPE tokenizer on a pretraining JSONL corpus ({"text": ...} per line).

    python jobs/tokenizer.py                                  # the demo world's corpus
    python jobs/tokenizer.py --data pretrain_hq.jsonl --vocab-size 6400 --output checkpoints/tokenizer
    python jobs/tokenizer.py --split-digits --split-han       # one token per digit and per Chinese character

MiniMind trained its 6400-token vocabulary on about 10k lines; --max-lines bounds how much is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from minimind.data.rows import iter_jsonl
from minimind.model.tokenizer import train_tokenizer
from minimind.training.flags import parse_config


@dataclass
class TokenizerJobConfig:
    data: str | None = field(default=None, metadata={"help": "pretraining JSONL; default: the demo world's pretrain.jsonl"})
    vocab_size: int = field(default=6400, metadata={"help": "vocabulary size, special tokens included"})
    max_lines: int = field(default=100_000, metadata={"help": "read at most this many lines"})
    split_digits: bool = field(
        default=False, metadata={"help": "every digit its own token (helps arithmetic; MiniMind's tokenizer merges digits)"}
    )
    split_han: bool = field(
        default=False, metadata={"help": "every Chinese character its own token (no phrase tokens: what the demo tokenizer does)"}
    )
    seed: int = field(default=0, metadata={"help": "without --data: the demo world of this seed"})
    output: str = field(default="checkpoints/tokenizer", metadata={"help": "directory to save the tokenizer to"})


def main(argv: list[str] | None = None) -> Path:
    config = parse_config(TokenizerJobConfig, argv, __doc__)
    if config.data is None:
        from minimind.demo import demo_data

        data = demo_data(config.seed)["pretrain"]
    else:
        data = Path(config.data)
    texts = (record["text"] for _, record in islice(iter_jsonl(data, "pretrain"), config.max_lines))
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size, split_digits=config.split_digits, split_han=config.split_han)
    output = Path(config.output)
    tokenizer.save_pretrained(str(output))
    print(f"trained a {len(tokenizer)}-token tokenizer on {data}; saved to {output}")
    return output


if __name__ == "__main__":
    main()
