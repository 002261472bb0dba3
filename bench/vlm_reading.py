"""Does the demo VLM read its pictures? VLM SFT outside Ray (the model, data, loss and bf16 autocast of
jobs/sft_vlm.py, plain AdamW at a constant learning rate), printing every --eval-every steps the held-out
image-question accuracy per question family and, on a fixed sample of training records, the loss with
their own pictures against the loss with each given another record's picture.

    python bench/vlm_reading.py --init models:/minimind-vlm-pretrain/latest --steps 1500   # 5x the pipeline's VLM SFT
    python bench/vlm_reading.py --init models:/minimind-sft/latest --fresh-llm --steps 1000  # a language model that knows nothing
    python bench/vlm_reading.py --init models:/minimind-sft/latest --center --steps 750     # features minus their mean
    python bench/vlm_reading.py --init models:/minimind-sft/latest --mlp-projector           # newer MiniMind-V's projector
    python bench/vlm_reading.py --init models:/minimind-sft/latest --fresh-llm --records 64 --steps 400 --eval-every 100

A language model (not a VLM folder) as --init gets the demo tower and a fresh projection. --center
subtracts the mean patch feature of 400 training pictures from every patch before the projection (in
the demo tower's features it has norm 12.6; what varies around it, 4.4). --records N trains on the first N
single-picture records only: can the model fit them, and does it use the pictures to?
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
        super().__init__(torch.nn.LayerNorm(vision_width), torch.nn.Linear(vision_width, width), torch.nn.GELU(), torch.nn.Linear(width, width))

    @property
    def weight(self):  # what MiniMindVLM reads for the projection's device, dtype and trainability
        return self[1].weight


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="models:/minimind-vlm-pretrain/latest", help="a VLM or language model: folder or models:/ URI")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--fresh-llm", action="store_true", help="replace the language model by a randomly initialised one of its shape")
    parser.add_argument("--center", action="store_true", help="subtract the training pictures' mean patch feature")
    parser.add_argument("--mlp-projector", action="store_true", help="newer MiniMind-V's projector: LayerNorm + Linear + GELU + Linear")
    parser.add_argument("--feature-layer", type=int, default=0, help="patch tokens from this hidden state of the tower (-2: the "
                                                                      "penultimate, as LLaVA-1.5; 0: the last, as MiniMind-V)")
    parser.add_argument("--records", type=int, default=0, help="train on the first N single-picture records only (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the demo world (and the projection's initialisation)")
    parser.add_argument("--vision-model", default=None, help="the tower a language model --init gets: folder or models:/ URI "
                                                              "(default: the demo's random tower)")
    args = parser.parse_args(argv)

    from minimind import tracking
    from minimind.data import StageData, collate, load_stage_dataset
    from minimind.demo import demo_data, demo_vision_tower
    from minimind.evaluate import image_question_accuracy, vlm_replier
    from minimind.model import MiniMindForCausalLM
    from minimind.tokenizer import load_tokenizer
    from minimind.vision import batch_pixel_values, build_vlm, is_vlm_dir, load_vlm

    tracking.configure()
    torch.manual_seed(args.seed)
    paths = demo_data(args.seed)
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
                patches = vlm.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[args.feature_layer][:, 1:]
            return vlm.projection(patches)

        vlm.image_features = layer_features
    vlm.requires_grad_(True).vision_tower.requires_grad_(False)
    vlm.train()

    rows = load_stage_dataset(paths["vlm_sft"], tokenizer, StageData("vlm", seq_len=256, image_tokens=vlm.image_tokens))
    single = [i for i in range(len(rows)) if len(rows[i]["images"]) == 1]
    order = single[: args.records] if args.records else list(range(len(rows)))
    probe = [rows[i] for i in single[:64]]  # the right-vs-shuffled pictures sample
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng, position, started = random.Random(args.seed), len(order), time.perf_counter()

    def loss_of(batch_rows, shuffled=False):
        batch = collate(batch_rows, tokenizer.pad_token_id)
        pixels = batch_pixel_values(vlm, batch["images"], paths["images"])
        if shuffled:
            pixels = pixels.roll(1, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return vlm(batch["input_ids"], pixel_values=pixels, labels=batch["labels"]).loss

    for step in range(1, args.steps + 1):
        if position + args.batch_size > len(order):
            rng.shuffle(order)
            position = 0
        loss = loss_of([rows[i] for i in order[position : position + args.batch_size]])
        position += args.batch_size
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % args.eval_every == 0 or step == args.steps:
            vlm.eval()
            with torch.no_grad():
                right, shuffled = loss_of(probe).item(), loss_of(probe, shuffled=True).item()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    result = image_question_accuracy(vlm_replier(vlm, tokenizer, max_new_tokens=16, batch_size=50), paths["vlm_sft_eval"],
                                                     paths["images"], limit=args.eval_limit)
            vlm.train()
            families = " ".join(f"{task} {value:.2f}" for task, value in result["by_task"].items())
            print(f"step {step:5d} | {time.perf_counter() - started:4.0f}s | train loss {loss.item():.3f} | sample loss, own pictures "
                  f"{right:.3f}, shuffled {shuffled:.3f} | held-out accuracy {result['accuracy']:.3f} ({families})", flush=True)


if __name__ == "__main__":
    main()
