import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from minimind.model.tokenizer import Markers, load_tokenizer
from minimind.training.flags import parse_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Example:
    name: str = field(default="x", metadata={"help": "a name"})
    steps: int = 3
    rate: float = 0.5
    resume: bool = False
    data: str | None = None


def test_flags_are_generated_from_the_dataclass():
    assert parse_config(Example, []) == Example()
    parsed = parse_config(Example, ["--name", "y", "--steps", "7", "--rate", "1e-3", "--resume", "--data", "a.jsonl"])
    assert parsed == Example(name="y", steps=7, rate=1e-3, resume=True, data="a.jsonl")
    with pytest.raises(SystemExit):
        parse_config(Example, ["--steps", "many"])


def test_training_jobs_take_cpu_as_the_short_no_use_gpu():
    from minimind.training.configs import TrainConfig

    assert parse_config(TrainConfig, []).use_gpu is None  # decided from the cluster
    assert parse_config(TrainConfig, ["--cpu"]).use_gpu is False
    assert parse_config(TrainConfig, ["--no-use-gpu"]).use_gpu is False
    assert parse_config(TrainConfig, ["--cpu", "--use-gpu"]).use_gpu is True


def test_tokenizer_job_trains_and_saves_a_loadable_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ["从前有座山。", "hello world"] * 50))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "tokenizer.py"),
            "--data",
            str(corpus),
            "--vocab-size",
            "300",
            "--output",
            str(tmp_path / "tok"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert f"trained a {len(tokenizer)}-token tokenizer" in result.stdout
    assert 256 < len(tokenizer) <= 300  # every byte, plus merges up to the requested size (a tiny corpus has few)
    assert tokenizer.decode(tokenizer("从前有座山。")["input_ids"]) == "从前有座山。"
    assert Markers.of(tokenizer).ids(tokenizer)["think_start"] == 3
