"""What the demo pipeline shows at its end: the same held-out prompts answered by the model of every
text stage, side by side (a pretrained model continues the start of the reference sentence instead), and
how each vision model describes unseen pictures: the share of descriptions that name a shape, colour or
count the picture does not hold, and their mean length.
"""

from __future__ import annotations

from pathlib import Path

from minimind.data.rows import iter_jsonl
from minimind.demo import demo_data
from minimind.demo.images import eval_scenes, hallucinations, named_things
from minimind.demo.world import build_world, showcase
from minimind.driver.evaluate import text_replier, vlm_replier
from minimind.driver.stages import STAGES
from minimind.inference.generate import generate
from minimind.model.checkpoint import load_model
from minimind.model.tokenizer import load_tokenizer
from minimind.model.vision import load_vlm

TEXT_STAGES = ("pretrain", "sft", "dpo", "reason")
SENTENCE_ENDS = "。？！\n"


def continue_text(model, tokenizer, prefixes: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of raw text, as pretraining saw it (after `<s>`), up to the end of the
    sentence the prefix is in."""
    prompts = [[tokenizer.bos_token_id, *tokenizer(prefix, add_special_tokens=False)["input_ids"]] for prefix in prefixes]
    outputs = generate(model, prompts, max_new_tokens=max_new_tokens, stop_token_ids=[tokenizer.eos_token_id])
    texts = []
    for prefix, tokens in zip(prefixes, outputs):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        end = min((i for i, ch in enumerate(text) if ch in SENTENCE_ENDS), default=len(text) - 1)
        texts.append(prefix + text[: end + 1].rstrip("\n"))
    return texts


def stage_answers(model_dirs: dict[str, Path], seed: int = 0) -> list[dict]:
    """One row per showcase prompt (minimind.demo.world.showcase): its task, prompt and reference, and
    the reply of each stage's model in a column named after the stage."""
    prompts = showcase(build_world(seed))
    rows = [{"task": p["task"], "prompt": p["question"]} for p in prompts]
    for stage, directory in model_dirs.items():
        model, tokenizer = load_model(directory).eval(), load_tokenizer(directory)
        if STAGES[stage].data_kind == "pretrain":  # a model of plain text continues it; the chat models answer
            replies = continue_text(model, tokenizer, [p["continuation"] for p in prompts])
        else:
            replies = text_replier(model, tokenizer, max_new_tokens=160, whole_reply=True)(
                [[{"role": "user", "content": p["question"]}] for p in prompts]
            )
        for row, reply in zip(rows, replies):
            row[stage] = reply
    for row, prompt in zip(rows, prompts):
        row["reference"] = prompt["reference"]
    return rows


def describe_pictures(model_dirs: dict[str, Path], limit: int = 200, seed: int = 0) -> dict[str, dict]:
    """Each vision model asked to describe the held-out pictures of VLM pretraining's eval file:
    {stage: {"pictures", "hallucination_rate", "describing_rate", "mean_reply_chars", "samples"}}. A reply that
    names no shape, colour or count at all hallucinates nothing; `describing_rate` says how many name any."""
    paths = demo_data(seed)
    scenes = eval_scenes(seed)
    records = [record for _, record in iter_jsonl(paths["vlm_pretrain_eval"], "vlm") if len(record["images"]) == 1][:limit]
    queries = [(record["conversations"][:1], [paths["images"] / record["images"][0]]) for record in records]
    report = {}
    for stage, directory in model_dirs.items():
        replies = vlm_replier(load_vlm(directory), load_tokenizer(directory))(queries)
        wrong = [hallucinations(reply, scenes[record["images"][0]]) for reply, record in zip(replies, records)]
        report[stage] = {
            "pictures": len(records),
            "hallucination_rate": sum(bool(w) for w in wrong) / max(len(wrong), 1),
            "describing_rate": sum(bool(named_things(reply)) for reply in replies) / max(len(replies), 1),
            "mean_reply_chars": sum(len(reply) for reply in replies) / max(len(replies), 1),
            "samples": [
                {
                    "image": record["images"][0],
                    "reply": reply,
                    "not_in_picture": "、".join(sorted(w)),
                    "reference": record["conversations"][-1]["content"],
                }
                for record, reply, w in list(zip(records, replies, wrong))[:5]
            ],
        }
    return report
