"""The embedded demo: a deterministic synthetic world that a tiny model visibly learns on a CPU.

`demo_data()` writes it once (seconds) and returns the file paths by name; later calls reuse the files.
They live under $MINIMIND_DEMO_DIR (default ~/.cache/minimind/demo), in a folder named after the seed
and a hash of the generator's source, so a changed generator never serves stale files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from minimind.data.rows import iter_jsonl
from minimind.data.tools import CALL_END, CALL_START
from minimind.demo.benchmark import write_benchmark
from minimind.demo.images import IMAGE_SIZE, picture_descriptions, write_image_world
from minimind.demo.tool_world import rl_rows, sum_pairs, tool_rows
from minimind.demo.world import build_world, write_jsonl, write_text_world
from minimind.model.tokenizer import TOOLS_CALL_FORM, TOOLS_PREAMBLE, train_tokenizer

# what writes the demo folder's files: a change to any of them is a new folder (the tokenizer's module holds
# the chat templates and special tokens the cached demo tokenizer is saved with)
GENERATORS = ("world.py", "images.py", "tool_world.py", "benchmark.py", "tools.py", "tools.json", "../model/tokenizer.py")


def _publish(folder: Path, write) -> None:
    """Build `folder` through `write(partial_folder)` and rename it into place: readers never see a
    half-written folder, and of two concurrent writers (same bytes) the second simply discards its copy."""
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    try:
        partial.rename(folder)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)


def _generator_hash() -> str:
    digest = hashlib.sha256()
    for name in GENERATORS:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]


def demo_data(seed: int = 0, root: str | Path | None = None) -> dict[str, Path]:
    """Absolute paths of the demo files: pretrain, sft, dpo, reason, tools, vlm_pretrain, vlm_sft (each
    with an `_eval` twin), tools_rl (GRPO's tool-use prompts; its `_eval` is tools_eval), `images` and `harness`
    (the folder of the demo's lm-evaluation-harness tasks)."""
    root = Path(root or os.environ.get("MINIMIND_DEMO_DIR", Path.home() / ".cache" / "minimind" / "demo"))
    folder = (root / f"seed{seed}-{_generator_hash()}").resolve()
    if not (folder / ".complete").exists():
        def write(partial: Path) -> None:
            write_text_world(partial, seed=seed, other_pretraining=picture_descriptions(seed))
            world = build_world(seed)
            rows, held_out = tool_rows(world)
            write_jsonl(partial / "tools.jsonl", rows)
            write_jsonl(partial / "tools_eval.jsonl", held_out)
            write_jsonl(partial / "tools_rl.jsonl", rl_rows(world, taken=sum_pairs(rows + held_out)))
            write_image_world(partial, seed=seed)
            write_benchmark(world, partial / "harness", folder / "harness")
            (partial / ".complete").touch()

        _publish(folder, write)
    names = ["pretrain", "sft", "dpo", "reason", "tools", "vlm_pretrain", "vlm_sft"]
    paths = {name: folder / f"{name}.jsonl" for name in names}
    paths.update({f"{name}_eval": folder / f"{name}_eval.jsonl" for name in names})
    paths["tools_rl"] = folder / "tools_rl.jsonl"  # GRPO's tool-use prompts (new numbers), scored on tools_eval
    paths["tools_rl_eval"] = paths["tools_eval"]
    paths["images"] = folder / "images"
    paths["harness"] = folder / "harness"  # lm-evaluation-harness tasks (minimind/demo/benchmark.py)
    return paths


DEMO_VOCAB_SIZE = 2048


def demo_texts(paths: dict[str, Path]):
    """Every text of the demo's training files: the pretraining corpus and each message of the chat files,
    with what the chat template writes of tools (their list and its instructions, each call), so that a
    prompt listing the demo's tools takes a few hundred tokens, not a thousand characters."""
    yield from (record["text"] for _, record in iter_jsonl(paths["pretrain"], "pretrain"))
    chat_files = (("sft", "sft"), ("dpo", "dpo"), ("reason", "reason"), ("tools", "sft"), ("vlm_pretrain", "vlm"),
                  ("vlm_sft", "vlm"))
    for name, kind in chat_files:
        for _, record in iter_jsonl(paths[name], kind):
            if record.get("tools"):
                yield TOOLS_PREAMBLE + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in record["tools"])
                yield TOOLS_CALL_FORM
            for key in ("conversations", "chosen", "rejected"):
                for message in record.get(key, ()):
                    content = message["content"]
                    yield f"<tool_response>\n{content}\n</tool_response>" if message["role"] == "tool" else content
                    for call in message.get("tool_calls", ()):
                        yield f"{CALL_START}\n{json.dumps(call['function'], ensure_ascii=False)}\n{CALL_END}"


def demo_tokenizer(seed: int = 0, root: str | Path | None = None, style: str = "minimind2") -> Path:
    """The demo's tokenizer directory, trained on first use (seconds) on every training text of the demo
    world, so the questions and traces of the later stages are words of the vocabulary too. One token per
    Chinese character and per digit: the demo's templated sentences would otherwise merge into phrase
    tokens that hide the facts from a small model (see `train_tokenizer`). `style`: MiniMind2's special
    tokens and chat template, or minimind-3's."""
    paths = demo_data(seed, root)
    suffix = "" if style == "minimind2" else f"-{style}"
    folder = paths["pretrain"].parent / f"tokenizer-{DEMO_VOCAB_SIZE}-han-digits{suffix}"
    if not (folder / "tokenizer.json").is_file():
        tokenizer = train_tokenizer(demo_texts(paths), vocab_size=DEMO_VOCAB_SIZE, split_digits=True, split_han=True,
                                    style=style)
        _publish(folder, lambda partial: tokenizer.save_pretrained(str(partial)))
    return folder


def demo_vision_tower(seed: int = 0, root: str | Path | None = None) -> Path:
    """The demo's CLIP vision tower folder: no CLIP weights can be downloaded here, so it is a small
    randomly initialised `CLIPVisionConfig` tower for the demo's 64-px images (4 x 4 patches of 16 px),
    saved with `save_pretrained` and loaded back through `from_pretrained` like real weights. Its features
    are fixed random functions of the patches: they tell colours and places apart, they know nothing."""
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    folder = demo_data(seed, root)["images"].parent / "clip-vision-demo"
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        config = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=IMAGE_SIZE, patch_size=16)
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )

        def write(partial: Path) -> None:
            CLIPVisionModel(config).save_pretrained(str(partial))
            processor.save_pretrained(str(partial))

        _publish(folder, write)
    return folder
