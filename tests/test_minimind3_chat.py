"""minimind-3's tokenizer and chat template through the stack: its special tokens, rows of every reply
shape, rewards, evaluation, Serve's reasoning_content, and a reasoning stage trained on it."""

import asyncio
import json

import numpy as np
import pytest
from conftest import memorized_model

from minimind.data.rows import StageData, encode_conversations, stage_rows, validate_record
from minimind.driver.evaluate import reasoning_scores, text_replier
from minimind.inference.chat import Chat, reply_opening
from minimind.model.checkpoint import load_model, save_model
from minimind.model.tokenizer import MINIMIND3_MARKERS, Markers, load_tokenizer, train_tokenizer
from minimind.rl.rewards import reasoning_parts, reference_answer
from minimind.serve.engine import ChatModel, Released
from minimind.serve.protocol import ChatRequest, Limits, parse_chat_request

TEXTS = ["从前有座山，山里有座庙。", "先算个位：3 加 4 等于 7。", "答案是 17。", "hello minimind 2026"]
QUESTION = [{"role": "user", "content": "13 加 4 等于几？"}]
REASONING, ANSWER = "先算个位：3 加 4 等于 7。", "答案是 17。"
SHAPES = {  # one reasoning reply, as each kind of data writes it
    "reasoning_content": {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING},
    "minimind-3 inline": {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"},
    "MiniMind2 tags": {"role": "assistant", "content": f"<think>\n{REASONING}\n</think>\n<answer>\n{ANSWER}\n</answer>"},
}


@pytest.fixture(scope="module")
def tokenizer3():
    return train_tokenizer(TEXTS * 20, vocab_size=400, split_han=True, style="minimind-3")


def reason_record(reply: dict) -> dict:
    return validate_record({"conversations": [*QUESTION, reply]}, "reason")


def test_the_minimind3_tokenizer_has_its_special_tokens_at_their_ids(tokenizer3, tmp_path):
    tokenizer3.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(tmp_path)
    for tokenizer in (tokenizer3, reloaded):
        named = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 12: "<|image_pad|>", 21: "<tool_call>",
                 22: "</tool_call>", 23: "<tool_response>", 24: "</tool_response>", 25: "<think>", 26: "</think>"}
        assert {i: tokenizer.convert_ids_to_tokens(i) for i in named} == named
        assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
        ids = tokenizer("<tool_call>{}</tool_call>", add_special_tokens=False)["input_ids"]
        assert (ids[0], ids[-1]) == (21, 22) and 21 not in ids[1:-1]  # each marker one token
        assert Markers.of(tokenizer) == MINIMIND3_MARKERS  # no <answer> tags; <|image_pad|> holds images
    assert Markers.of(train_tokenizer(TEXTS, vocab_size=300)) == Markers()  # MiniMind2's style keeps its own


def test_reasoning_rows_in_every_shape_render_as_minimind3_writes_them(tokenizer3):
    stage = StageData("reason", seq_len=256)
    marker_ids = stage.marker_ids(tokenizer3)
    rows = [stage_rows([reason_record(reply)], stage, tokenizer3, marker_ids)[0] for reply in SHAPES.values()]
    assert rows[0] == rows[1] == rows[2]
    row = rows[0]
    assert tokenizer3.decode(row["input_ids"]) == (
        f"<|im_start|>user\n{QUESTION[0]['content']}<|im_end|>\n<|im_start|>assistant\n<think>\n{REASONING}\n</think>\n\n"
        f"{ANSWER}<|im_end|>\n"
    )
    labelled = [token for token in row["labels"] if token != -100]
    assert tokenizer3.decode(labelled) == f"{REASONING}\n</think>\n\n{ANSWER}<|im_end|>"  # the opened <think> is the prompt's
    weights = np.asarray(row["loss_weights"])
    assert set(np.asarray(row["input_ids"])[weights == 10.0]) == {26}  # </think>, the tag the reply writes

    plain = validate_record({"conversations": [*QUESTION, {"role": "assistant", "content": ANSWER}]}, "sft")
    ((ids, supervised),) = encode_conversations(tokenizer3, [plain["conversations"]])
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n" + ANSWER in tokenizer3.decode(ids)  # the empty think block
    assert tokenizer3.decode(ids[supervised]) == ANSWER + "<|im_end|>"


def test_reasoning_given_apart_is_written_in_minimind2s_tags_for_a_minimind2_tokenizer():
    tokenizer2 = train_tokenizer(TEXTS * 20, vocab_size=400)
    encoded = [encode_conversations(tokenizer2, [reason_record(reply)["conversations"]])[0] for reply in SHAPES.values()]
    (ids, supervised), (inline_ids, _), (tagged_ids, _) = encoded
    assert ids.tolist() == tagged_ids.tolist()  # reasoning_content folded into <think>/<answer>, as the data writes it
    assert tokenizer2.decode(ids[supervised]) == f"<think>\n{REASONING}\n</think>\n<answer>\n{ANSWER}\n</answer></s>"
    assert tokenizer2.decode(inline_ids).count("<answer>") == 0  # a MiniMind2 template renders minimind-3's text as given


def test_minimind3_replies_are_parsed_for_rewards_and_streamed_as_reasoning_content():
    m3 = MINIMIND3_MARKERS
    reply = f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"
    assert reasoning_parts(reply, m3) == (REASONING, ANSWER)
    assert reasoning_parts(f"<think>\n{REASONING}\n</think>\n\n", m3) is None  # no answer
    assert reasoning_parts(reply + "<think>", m3) is None  # a doubled tag
    assert reasoning_parts(reply, Markers()) is None  # MiniMind2's form needs its <answer> tags
    assert {reference_answer(message, m3) for message in SHAPES.values()} == {ANSWER}

    def streamed(opening: str, text: str) -> tuple[str, str]:
        released, reasoning, content = Released(m3, opening), "", ""
        for end in range(1, len(text) + 1):
            if delta := released.extend(text[:end], final=end == len(text)):
                reasoning, content = reasoning + delta["reasoning"], content + delta["content"]
        return reasoning, content

    assert streamed("<think>\n", f"{REASONING}\n</think>\n\n{ANSWER}") == (REASONING, ANSWER)
    assert streamed("<think>\n\n</think>\n\n", "你好\n") == ("", "你好")


def test_a_minimind3_reasoning_model_thinks_when_asked_is_scored_and_served_with_reasoning_content(tokenizer3, tmp_path):
    tokenizer3 = load_tokenizer(_saved(tokenizer3, tmp_path / "tokenizer"))
    assert reply_opening(tokenizer3) == "<think>\n\n</think>\n\n"  # minimind-3's default: a direct reply
    assert reply_opening(tokenizer3, thinking=True) == "<think>\n"  # thinking, asked for per prompt
    thinking = load_tokenizer(tmp_path / "tokenizer")
    thinking.init_kwargs["open_thinking"] = True  # a tokenizer config can make it the default
    assert reply_opening(thinking) == "<think>\n"
    model = memorized_model(thinking, QUESTION, f"{REASONING}\n</think>\n\n{ANSWER}", qk_norm=True, attention_head_dim=8)
    save_model(model, tmp_path / "model", tokenizer=tokenizer3)  # saved without the default: asked for below

    eval_file = tmp_path / "reason_eval.jsonl"
    eval_file.write_text(json.dumps({"conversations": [*QUESTION, SHAPES["MiniMind2 tags"]]}, ensure_ascii=False) + "\n")
    chat = Chat.load(tmp_path / "model", device="cpu", dtype="fp32")
    replier = text_replier(chat.model, chat.tokenizer, max_new_tokens=40, whole_reply=True, thinking=True)
    scores = reasoning_scores(replier, eval_file, chat.tokenizer)
    assert (scores["format"], scores["accuracy"]) == (1.0, 1.0)

    served = ChatModel(tmp_path / "model", device="cpu", dtype="fp32", compile="off")

    async def events(**request):
        return [event async for event in served.chat(ChatRequest("m", QUESTION, temperature=0.0, max_tokens=40, **request))]

    deltas = [event for event in asyncio.run(events(thinking=True)) if event["type"] == "delta"]
    assert ("".join(d["reasoning"] for d in deltas), "".join(d["content"] for d in deltas)) == (REASONING, ANSWER)
    assert parse_chat_request({"model": "m", "messages": QUESTION, "chat_template_kwargs": {"enable_thinking": True}},
                              {"m": False}, Limits()).thinking is True


def _saved(tokenizer, folder):
    tokenizer.save_pretrained(str(folder))
    return folder


def test_a_reasoning_stage_trains_a_minimind3_model_from_its_preset(ray_cluster, tmp_path):
    """`--preset minimind-3` with a minimind-3 tokenizer builds the model (narrowed here); the reasoning stage's
    rows, loop and evaluation take it, on the demo's MiniMind2-format traces written in minimind-3's template.
    (In-process Ray Train: the stage jobs' registration is the pipeline test's.)"""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from minimind.data.prepare import prepare
    from minimind.demo import demo_data, demo_texts
    from minimind.driver.inputs import starting_model
    from minimind.driver.stages import STAGES, evaluate_reasoning
    from minimind.training.configs import DistillConfig, PretrainConfig
    from minimind.training.loop import StageJob, train_loop_per_worker

    paths = demo_data(0)
    tokenizer_dir = _saved(train_tokenizer(demo_texts(paths), vocab_size=2048, split_han=True, split_digits=True,
                                           style="minimind-3"), tmp_path / "tokenizer")
    narrow = "hidden_size=64,intermediate_size=192,num_hidden_layers=2,attention_head_dim=16"
    pretrain = PretrainConfig(preset="minimind-3", tokenizer=str(tokenizer_dir), config_overrides=narrow)
    init_dir, tags = starting_model(pretrain, STAGES["pretrain"], tmp_path / "work")
    config = load_model(init_dir).config
    assert tags["source.uri"] == "scratch:minimind-3"
    assert (config.qk_norm, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (True, 8, 4, 16)
    assert (config.rope_theta, config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1e6, 1, 2, 0)

    tokenizer = load_tokenizer(init_dir)
    source = tmp_path / "reason.jsonl"
    source.write_text("".join(paths["reason"].read_text(encoding="utf-8").splitlines(keepends=True)[:40]), encoding="utf-8")
    prepared = prepare(str(source), tokenizer, StageData("reason", seq_len=256), str(tmp_path / "prepared"))
    assert prepared.manifest["tag_sequences"] == [[25], [26]]  # <think>, </think>: one token each, no answer tags
    stage_config = DistillConfig(max_steps=2, batch_size=2, seq_len=256)
    stage_config.cpus_per_worker, stage_config.checkpoint_every = 1, 100
    job = StageJob(STAGES["reason"], stage_config, init_dir=str(init_dir), data_path=prepared.location)
    in_process = ScalingConfig(num_workers=0)
    result = TorchTrainer(train_loop_per_worker, train_loop_config={"job": job}, scaling_config=in_process).fit()
    assert result.metrics["step"] == 2 and 0 < result.metrics["train/loss"] < 20
    metrics, samples = evaluate_reasoning(STAGES["reason"], load_model(init_dir), tokenizer, paths["reason_eval"], 4, 256)
    assert {"eval/reasoning_format", "eval/reasoning_accuracy", "eval/heldout_loss"} <= metrics.keys()
    assert samples[0]["reply"].startswith("<think>\n")  # the reply, with the think block its prompt opened


def test_minimind3s_t2t_files_load_ignoring_fields_no_stage_uses_and_name_the_line_of_a_bad_one(tokenizer3, tmp_path):
    from minimind.data.rows import DataFormatError, iter_jsonl

    pretrain = tmp_path / "pretrain_t2t_mini.jsonl"
    pretrain.write_text(json.dumps({"text": "从前有座山", "source": "web", "id": 7}, ensure_ascii=False) + "\n")
    assert [record for _, record in iter_jsonl(pretrain, "pretrain")] == [{"text": "从前有座山"}]

    system = {"role": "system", "content": "你是 MiniMind。", "name": "persona"}
    lines = [
        {"conversations": [system, *QUESTION, {**SHAPES["reasoning_content"], "weight": 1}], "meta": {"lang": "zh"}},
        {"conversations": [*QUESTION, {"role": "assistant", "content": ANSWER}]},
        {"conversations": [*QUESTION, {"role": "assistant", "content": None,
                                       "tool_calls": [{"name": "add", "arguments": {"a": 13, "b": 4}}]}]},
        {"conversations": [*QUESTION, {"role": "observer", "content": "?"}, {"role": "assistant", "content": ANSWER}]},
    ]
    sft = tmp_path / "sft_t2t_mini.jsonl"
    sft.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    with pytest.raises(DataFormatError, match=r"sft_t2t_mini.jsonl:4: .*role 'observer'; expected one of system, user"):
        list(iter_jsonl(sft, "sft"))
    records = [record for _, record in iter_jsonl(sft, "sft", skip_bad=True)]
    assert [record["conversations"][-1] for record in records][:2] == [SHAPES["reasoning_content"], lines[1]["conversations"][-1]]
    assert records[2]["conversations"][-1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 13, "b": 4}}
    assert records[0]["conversations"][0] == {"role": "system", "content": "你是 MiniMind。"}
    stage = StageData("sft", seq_len=256)
    rows = stage_rows(records, stage, tokenizer3, stage.marker_ids(tokenizer3))
    assert f"<think>\n{REASONING}\n</think>\n\n{ANSWER}" in tokenizer3.decode(rows[0]["input_ids"])

