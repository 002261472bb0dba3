"""Does the demo VLM read its pictures? VLM SFT outside Ray (the model, data, loss and bf16 autocast of
jobs/sft_vlm.py, plain AdamW at a constant learning rate), printing every --eval-every steps the held-out
image-question accuracy per question family and, on a fixed sample of training records, the loss with
their own pictures against the loss with each given another record's picture.

    python bench/vlm_reading.py --init models:/minimind-vlm-pretrain/latest --steps 1500   # 5x the pipeline's VLM SFT
    python bench/vlm_reading.py --init models:/minimind-sft/latest --fresh-llm --steps 1000  # a language model that knows nothing
    python bench/vlm_reading.py --init models:/minimind-sft/latest --center --steps 750     # features minus their mean
    python bench/vlm_reading.py --init models:/minimind-sft/latest --mlp-projector           # newer MiniMind-V's projector
    python bench/vlm_reading.py --init models:/minimind-sft/latest --fresh-llm --records 64 --steps 400 --eval-every 100
    python bench/vlm_reading.py --init models:/minimind-sft/latest --read-captions --steps 900 --eval-every 300  # no pictures

A language model (not a VLM folder) as --init gets the demo tower and a fresh projection. --center
subtracts the mean patch feature of 400 training pictures from every patch before the projection (in
the demo tower's features it has norm 12.6; what varies around it, 4.4). --records N trains on the first N
single-picture records only: can the model fit them, and does it use the pictures to?

--read-captions takes the pictures away: each <image> becomes its caption's text, in brackets, and the
language model alone trains on the same records (the SFT loop, same learning rate and batch) and answers
the held-out questions with the caption of the held-out picture in its prompt. A perfect tower could
give the language model no more than those words; if it cannot answer from them, the tower is not what
fails.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


class MLPProjector(torch.nn.Sequential):
    def __init__(self, vision_width: int, width: int):
        super().__init__(
            torch.nn.LayerNorm(vision_width), torch.nn.Linear(vision_width, width), torch.nn.GELU(), torch.nn.Linear(width, width)
        )

    @property
    def weight(self):  # what MiniMindVLM reads for the projection's device, dtype and trainability
        return self[1].weight


def shuffled_batches(order: list[int], batch_size: int, rng: random.Random):
    """Batches of indices without end: each pass over `order` in a new random order, a short tail dropped."""
    position = len(order)
    while True:
        if position + batch_size > len(order):
            rng.shuffle(order)
            position = 0
        yield order[position : position + batch_size]
        position += batch_size


def optimiser_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--init", default="models:/minimind-vlm-pretrain/latest", help="a VLM or language model: folder or models:/ URI"
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument(
        "--fresh-llm", action="store_true", help="replace the language model by a randomly initialised one of its shape"
    )
    parser.add_argument("--center", action="store_true", help="subtract the training pictures' mean patch feature")
    parser.add_argument(
        "--mlp-projector", action="store_true", help="newer MiniMind-V's projector: LayerNorm + Linear + GELU + Linear"
    )
    parser.add_argument(
        "--feature-layer",
        type=int,
        default=0,
        help="patch tokens from this hidden state of the tower (-2: the penultimate, as LLaVA-1.5; 0: the last, as MiniMind-V)",
    )
    parser.add_argument("--records", type=int, default=0, help="train on the first N single-picture records only (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the demo world (and the projection's initialisation)")
    parser.add_argument(
        "--read-captions",
        action="store_true",
        help="no pictures: each <image> replaced by its caption's text (the language model alone, --init a language model)",
    )
    parser.add_argument(
        "--vision-model",
        default=None,
        help="the tower a language model --init gets: folder or models:/ URI (default: the demo's random tower)",
    )
    args = parser.parse_args(argv)

    from minimind import tracking
    from minimind.data.pixels import batch_pixel_values
    from minimind.data.rows import StageData, collate, load_stage_dataset
    from minimind.demo import demo_data, demo_vision_tower
    from minimind.driver.evaluate import image_question_accuracy, vlm_replier
    from minimind.model.model import MiniMindForCausalLM
    from minimind.model.tokenizer import load_tokenizer
    from minimind.model.vision import build_vlm, is_vlm_dir, load_vlm

    tracking.configure()
    torch.manual_seed(args.seed)
    paths = demo_data(args.seed)
    if args.read_captions:
        return read_captions(args, paths)
    init = tracking.resolve_model(args.init)
    tower = tracking.resolve_model(args.vision_model) if args.vision_model else demo_vision_tower(args.seed)
    vlm = load_vlm(init) if is_vlm_dir(init) else build_vlm(init, tower, seed=args.seed)[0]
    tokenizer = load_tokenizer(init)
    if args.fresh_llm:
        vlm.language_model = MiniMindForCausalLM(vlm.language_model.config)
    if args.mlp_projector:
        vlm.projection = MLPProjector(vlm.vision_tower.config.hidden_size, vlm.language_model.config.hidden_size)
    if args.center:
        pixels = batch_pixel_values(vlm, [[f"train_{i:05d}.png"] for i in range(400)], paths["images"])
        with torch.no_grad():
            mean = vlm.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:].mean((0, 1))

        def centred_features(pixel_values):
            with torch.no_grad():
                patches = vlm.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:] - mean
            return vlm.projection(patches)

        vlm.image_features = centred_features
    if args.feature_layer:

        def layer_features(pixel_values):
            with torch.no_grad():
                patches = vlm.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[
                    args.feature_layer
                ][:, 1:]
            return vlm.projection(patches)

        vlm.image_features = layer_features
    vlm.requires_grad_(True).vision_tower.requires_grad_(False)
    vlm.train()

    rows = load_stage_dataset(paths["vlm_sft"], tokenizer, StageData("vlm", seq_len=256, image_tokens=vlm.image_tokens))
    single = [i for i in range(len(rows)) if len(rows[i]["images"]) == 1]
    order = single[: args.records] if args.records else list(range(len(rows)))
    probe = [rows[i] for i in single[:64]]  # the right-vs-shuffled pictures sample
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    batches, started = shuffled_batches(order, args.batch_size, random.Random(args.seed)), time.perf_counter()

    def loss_of(batch_rows, shuffled=False):
        batch = collate(batch_rows, tokenizer.pad_token_id)
        pixels = batch_pixel_values(vlm, batch["images"], paths["images"])
        if shuffled:
            pixels = pixels.roll(1, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return vlm(batch["input_ids"], pixel_values=pixels, labels=batch["labels"]).loss

    for step in range(1, args.steps + 1):
        loss = loss_of([rows[i] for i in next(batches)])
        optimiser_step(loss, vlm, optimizer)
        if step % args.eval_every == 0 or step == args.steps:
            vlm.eval()
            with torch.no_grad():
                right, shuffled = loss_of(probe).item(), loss_of(probe, shuffled=True).item()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    result = image_question_accuracy(
                        vlm_replier(vlm, tokenizer, max_new_tokens=16, batch_size=50),
                        paths["vlm_sft_eval"],
                        paths["images"],
                        limit=args.eval_limit,
                    )
            vlm.train()
            families = " ".join(f"{task} {value:.2f}" for task, value in result["by_task"].items())
            print(
                f"step {step:5d} | {time.perf_counter() - started:4.0f}s | train loss {loss.item():.3f} | "
                f"sample loss, own pictures {right:.3f}, shuffled {shuffled:.3f} | "
                f"held-out accuracy {result['accuracy']:.3f} ({families})",
                flush=True,
            )


def captions_as_text(path: Path, captions: dict[str, str], out: Path) -> Path:
    """The VLM JSONL at `path` with each <image> of a record replaced by its picture's caption, in brackets."""
    import json

    from minimind.demo.images import IMAGE

    with open(path, encoding="utf-8") as source, open(out, "w", encoding="utf-8") as target:
        for line in source:
            record = json.loads(line)
            text = record["conversations"][0]["content"]
            for name in record.pop("image", "").split(",") if record.get("image") else []:
                text = text.replace(f"{IMAGE}\n", f"[{captions[name]}]\n", 1)
            record["conversations"][0]["content"] = text
            target.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def read_captions(args, paths: dict) -> None:
    import tempfile

    from minimind import tracking
    from minimind.data.rows import StageData, collate, load_stage_dataset
    from minimind.demo.images import NUM_EVAL, NUM_TRAIN, caption, sample_scenes
    from minimind.driver.evaluate import image_question_accuracy, text_replier
    from minimind.model.checkpoint import load_model
    from minimind.model.tokenizer import load_tokenizer

    init = tracking.resolve_model(args.init)
    model, tokenizer = load_model(init), load_tokenizer(init)
    train, held_out = sample_scenes(args.seed, NUM_TRAIN, NUM_EVAL)
    captions = {f"train_{i:05d}.png": caption(scene) for i, scene in enumerate(train)}
    captions |= {f"eval_{i:05d}.png": caption(scene) for i, scene in enumerate(held_out)}
    folder = Path(tempfile.mkdtemp(prefix="read-captions-"))
    train_file = captions_as_text(paths["vlm_sft"], captions, folder / "train.jsonl")
    eval_file = captions_as_text(paths["vlm_sft_eval"], captions, folder / "eval.jsonl")
    rows = load_stage_dataset(train_file, tokenizer, StageData("sft", seq_len=256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    replier = text_replier(model, tokenizer, max_new_tokens=16)
    batches, started = shuffled_batches(list(range(len(rows))), args.batch_size, random.Random(args.seed)), time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        batch = collate([rows[i] for i in next(batches)], tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"]).loss
        optimiser_step(loss, model, optimizer)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                result = image_question_accuracy(
                    lambda queries: replier([conversation for conversation, _ in queries]),
                    eval_file,
                    paths["images"],
                    limit=args.eval_limit,
                )
            model.train()
            families = " ".join(f"{task} {value:.2f}" for task, value in result["by_task"].items())
            print(
                f"step {step:5d} | {time.perf_counter() - started:4.0f}s | train loss {loss.item():.3f} | held-out accuracy, "
                f"captions as text {result['accuracy']:.3f} ({families})",
                flush=True,
            )


if __name__ == "__main__":
    main()
