"""Train the byte-level BPE tokenizer on a pretraining JSONL corpus ({"text": ...} per line).

    python jobs/tokenizer.py                                  # the demo world's corpus
    python jobs/tokenizer.py --data pretrain_hq.jsonl --vocab-size 6400 --output checkpoints/tokenizer
    python jobs/tokenizer.py --split-digits --split-han       # one token per digit and per Chinese character
    python jobs/tokenizer.py --style minimind-3               # minimind-3's special tokens and chat template

MiniMind trained its 6400-token vocabulary on about 10k lines; --max-lines bounds how much is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from minimind.data.rows import iter_jsonl
from minimind.model.tokenizer import train_tokenizer
from minimind.training.flags import option, parse_config


@dataclass
class TokenizerJobConfig:
    data: str | None = option("pretraining JSONL; default: the demo world's pretrain.jsonl", default=None)
    vocab_size: int = option("vocabulary size, special tokens included", default=6400)
    max_lines: int = option("read at most this many lines", default=100_000)
    split_digits: bool = option("every digit its own token (helps arithmetic; MiniMind's tokenizer merges digits)", default=False)
    split_han: bool = option(
        "every Chinese character its own token (no phrase tokens: what the demo tokenizer does)", default=False
    )
    style: str = option("special tokens and chat template: minimind2 or minimind-3", default="minimind2")
    seed: int = option("without --data: the demo world of this seed", default=0)
    output: str = option("directory to save the tokenizer to", default="checkpoints/tokenizer")


def main(argv: list[str] | None = None) -> Path:
    config = parse_config(TokenizerJobConfig, argv, __doc__)
    if config.data is None:
        from minimind.demo import demo_data

        data = demo_data(config.seed)["pretrain"]
    else:
        data = Path(config.data)
    texts = (record["text"] for _, record in islice(iter_jsonl(data, "pretrain"), config.max_lines))
    tokenizer = train_tokenizer(
        texts, vocab_size=config.vocab_size, split_digits=config.split_digits, split_han=config.split_han, style=config.style
    )
    output = Path(config.output)
    tokenizer.save_pretrained(str(output))
    print(f"trained a {len(tokenizer)}-token tokenizer on {data}; saved to {output}")
    return output


if __name__ == "__main__":
    main()
