import json

import pytest
import torch

from minimind.data.rows import (
    DataFormatError,
    LengthGroupedBatches,
    StageData,
    collate,
    count_records,
    iter_jsonl,
    load_stage_dataset,
    pack_documents,
    read_jsonl_dataset,
    row_lengths,
    tokenize_conversations,
)
from minimind.model.losses import IGNORE_INDEX
from minimind.model.tokenizer import Markers, train_tokenizer

CORPUS = ["小明喜欢红色。小红住在北京。", "What is 12 + 30? It is 42.", "<think> 先想一想 </think> <answer> 答案 </answer>"] * 20
CONVERSATION = [
    {"role": "system", "content": "你是助手。"},
    {"role": "user", "content": "小明喜欢什么颜色？"},
    {"role": "assistant", "content": "小明喜欢红色。"},
    {"role": "user", "content": "小红住在哪里？"},
    {"role": "assistant", "content": "小红住在北京。"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=500)


def write_jsonl(path, records):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records), encoding="utf-8"
    )
    return path


def supervised_text(tokenizer, ids, labels):
    return tokenizer.decode([token for token, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_sft_labels_cover_exactly_every_assistant_reply_and_its_end_of_turn(tokenizer):
    ids, labels = tokenize_conversations(tokenizer, [CONVERSATION])[0]
    assert supervised_text(tokenizer, ids, labels) == "小明喜欢红色。</s>小红住在北京。</s>"
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels))
    runs = sum(1 for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX))
    assert runs == 2  # one contiguous span per assistant turn
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_dpo_rows_supervise_only_the_final_reply(tokenizer, tmp_path):
    prompt = CONVERSATION[:4]
    record = {
        "chosen": prompt + [{"role": "assistant", "content": "北京。"}],
        "rejected": prompt + [{"role": "assistant", "content": "上海吧，大概。"}],
    }
    rows = load_stage_dataset(write_jsonl(tmp_path / "dpo.jsonl", [record]), tokenizer, StageData("dpo", seq_len=256))
    row = rows[0]
    assert supervised_text(tokenizer, row["chosen_input_ids"], row["chosen_labels"]) == "北京。</s>"
    assert supervised_text(tokenizer, row["rejected_input_ids"], row["rejected_labels"]) == "上海吧，大概。</s>"


def test_reasoning_tag_weights_land_on_the_tag_tokens_only(tokenizer, tmp_path):
    reply = "<think>\n12 加 30 等于 42\n</think>\n<answer>\n42\n</answer>"
    record = {"conversations": [{"role": "user", "content": "<think> 12+30？"}, {"role": "assistant", "content": reply}]}
    row = load_stage_dataset(
        write_jsonl(tmp_path / "r.jsonl", [record]), tokenizer, StageData("reason", seq_len=256, tag_weight=10)
    )[0]
    tag_ids = {ids[0] for ids in Markers.of(tokenizer).tag_sequences(tokenizer)}  # single tokens in our tokenizer
    for token, label, weight in zip(row["input_ids"], row["labels"], row["loss_weights"]):
        if label == IGNORE_INDEX:
            assert weight == 0.0  # includes the <think> the user typed: not supervised, not weighted
        else:
            assert weight == (10.0 if token in tag_ids else 1.0)
    assert sum(w == 10.0 for w in row["loss_weights"]) == 4


def test_tags_of_several_tokens_weight_exactly_their_own_positions(byte_tokenizer, tmp_path):
    """A tokenizer with MiniMind2's layout spells <think> as several tokens: all of them get the tag weight
    where a tag stands, and a `<` or `think` elsewhere in the reply gets none (MiniMind2's x10 hit those)."""
    import numpy as np

    from minimind.data.rows import tag_mask

    sequences = Markers.of(byte_tokenizer).tag_sequences(byte_tokenizer)
    assert all(len(ids) > 1 for ids in sequences)
    reply = "<think>\n3 < 5, think twice\n</think>\n<answer>\n5\n</answer>"
    record = {"conversations": [{"role": "user", "content": "3 < 5？"}, {"role": "assistant", "content": reply}]}
    row = load_stage_dataset(
        write_jsonl(tmp_path / "r.jsonl", [record]), byte_tokenizer, StageData("reason", seq_len=256, tag_weight=10)
    )[0]
    weighted = [token for token, weight in zip(row["input_ids"], row["loss_weights"]) if weight == 10.0]
    assert byte_tokenizer.decode(weighted) == "<think></think><answer></answer>"
    assert len(weighted) == sum(map(len, sequences))
    assert tag_mask(np.array([5, 7, 5, 7, 9]), [[5, 7], [9]]).tolist() == [True] * 5
    assert tag_mask(np.array([5, 9, 7]), [[5, 7]]).tolist() == [False] * 3


def test_vlm_rows_expand_each_image_placeholder(tokenizer, tmp_path):
    record = {
        "conversations": [
            {"role": "user", "content": "<image>\n<image>\n两张图一样吗？"},
            {"role": "assistant", "content": "一样。"},
        ],
        "image": "a.png, b.png",
    }
    row = load_stage_dataset(
        write_jsonl(tmp_path / "v.jsonl", [record]), tokenizer, StageData("vlm", seq_len=256, image_tokens=5)
    )[0]
    image_id = Markers.of(tokenizer).ids(tokenizer)["image"]
    positions = [i for i, token in enumerate(row["input_ids"]) if token == image_id]
    assert len(positions) == 10 and all(row["labels"][i] == IGNORE_INDEX for i in positions)
    assert row["images"] == ["a.png", "b.png"]


def test_vlm_rows_are_never_cut_through_an_image(tokenizer):
    from minimind.data.rows import stage_row

    record = {
        "conversations": [{"role": "user", "content": "看<image><image>"}, {"role": "assistant", "content": "一样。"}],
        "images": ["a.png", "b.png"],
    }
    image_id = Markers.of(tokenizer).ids(tokenizer)["image"]
    whole = StageData("vlm", seq_len=512, image_tokens=5)
    first = stage_row(record, whole, tokenizer, whole.marker_ids(tokenizer))["input_ids"].index(image_id)
    cut = StageData("vlm", seq_len=first + 7, image_tokens=5)  # the second image's run is cut after 2 tokens
    row = stage_row(record, cut, tokenizer, cut.marker_ids(tokenizer))
    assert row["images"] == ["a.png"] and len(row["input_ids"]) == first + 5  # it ends where the second image began
    assert sum(token == image_id for token in row["input_ids"]) == 5


def test_packing_loses_and_duplicates_nothing():
    documents = [[1] + list(range(10 * d, 10 * d + length)) + [2] for d, length in enumerate([3, 17, 1, 8, 30, 5])]
    rows = list(pack_documents(documents, seq_len=16, pad_id=0))
    assert all(len(row["input_ids"]) == 16 for row in rows)
    assert all(row["length"] == 16 for row in rows[:-1])
    flat = [token for row in rows for token in row["input_ids"][: row["length"]]]
    assert flat == [token for document in documents for token in document]


def test_pretrain_dataset_is_packed_with_documents_separated(tokenizer, tmp_path):
    texts = [{"text": t} for t in ["小明喜欢红色。", "小红住在北京。", "What is 12 + 30?"] * 7]
    rows = load_stage_dataset(write_jsonl(tmp_path / "p.jsonl", texts), tokenizer, StageData("pretrain", seq_len=32))
    flat = [token for row in rows for token in row["input_ids"][: row["length"]]]
    expected = [token for t in texts for token in tokenizer("<s>" + t["text"] + "</s>", add_special_tokens=False)["input_ids"]]
    assert flat == expected
    assert flat.count(tokenizer.eos_token_id) == len(texts)
    batch = collate([rows[i] for i in range(len(rows))], pad_id=0)
    assert batch["input_ids"].shape == (len(rows), 32)
    assert (batch["labels"] == IGNORE_INDEX).sum() == 32 - rows[len(rows) - 1]["length"]


@pytest.mark.parametrize(
    "line, complaint",
    [
        ('{"conversations": [{"role": "user", "content": "hi"}', "Expecting"),
        ('{"messages": []}', '"conversations" must be a non-empty list'),
        ('{"conversations": []}', '"conversations" must be a non-empty list'),
        ('{"conversations": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
        ('{"conversations": [{"role": "user", "content": "hi"}]}', "no assistant reply"),
        ('{"conversations": [{"role": "user"}]}', 'needs a string "content"'),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_lines_name_the_file_and_line(tmp_path, line, complaint):
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "sft.jsonl", [good, good, line, good])
    with pytest.raises(DataFormatError, match=rf"sft.jsonl:3: .*{complaint}"):
        list(iter_jsonl(path, "sft"))
    with pytest.raises(DataFormatError, match="sft.jsonl:3"):
        read_jsonl_dataset(path, "sft")
    dataset = read_jsonl_dataset(path, "sft", skip_bad=True)
    assert len(dataset) == 3 and count_records(path) - len(dataset) == 1


def test_files_as_editors_save_them_are_read_and_bad_bytes_name_their_line(tmp_path):
    good = json.dumps(
        {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}, ensure_ascii=False
    )
    windows = tmp_path / "windows.jsonl"  # a byte-order mark, CRLF line ends and blank lines, as a Windows editor saves it
    windows.write_bytes(b"\xef\xbb\xbf" + (good + "\r\n\r\n" + good + "\r\n").encode())
    assert [number for number, _ in iter_jsonl(windows, "sft")] == [1, 3]
    assert len(read_jsonl_dataset(windows, "sft")) == 2 == count_records(windows)

    latin1 = tmp_path / "mixed.jsonl"  # line 2 was saved in another encoding
    latin1.write_bytes(
        (good + "\n").encode() + '{"text": "café"}'.encode("latin-1").replace(b'"text"', b'"x"') + b"\n" + (good + "\n").encode()
    )
    with pytest.raises(DataFormatError, match=r"mixed.jsonl:2: not valid UTF-8"):
        list(iter_jsonl(latin1, "sft"))
    with pytest.raises(DataFormatError, match=r"mixed.jsonl:2: not valid UTF-8"):
        read_jsonl_dataset(latin1, "sft")  # not datasets' bare UnicodeDecodeError
    skipped = read_jsonl_dataset(latin1, "sft", skip_bad=True)
    assert len(skipped) == 2 and count_records(latin1) - len(skipped) == 1


@pytest.mark.parametrize(
    "kind, record, complaint",
    [
        ("pretrain", {"text": ["a list"]}, 'needs a string "text"'),
        ("pretrain", {"txt": "a"}, 'needs a string "text"'),
        ("dpo", {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, '"rejected"'),
        (
            "dpo",
            {
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "end with an assistant",
        ),
        (
            "vlm",
            {"conversations": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}]},
            "1 <image> marker",
        ),
    ],
)
def test_each_format_is_validated(tmp_path, kind, record, complaint):
    with pytest.raises(DataFormatError, match=f"{kind}.jsonl:1: .*{complaint}"):
        list(iter_jsonl(write_jsonl(tmp_path / f"{kind}.jsonl", [record]), kind))


def test_a_blank_pretraining_text_is_well_formed_and_left_out(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "一"}, {"text": " "}, {"text": ""}, {"text": "\t\n"}, {"text": "二"}])
    assert [(number, record["text"]) for number, record in iter_jsonl(path, "pretrain")] == [(1, "一"), (5, "二")]
    assert len(read_jsonl_dataset(path, "pretrain")) == 2


def test_the_arrow_cache_is_not_reused_for_a_file_edited_with_its_mtime_restored(tmp_path):
    import os

    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "第41行"}, {"text": "第2行"}])
    stat = path.stat()
    assert read_jsonl_dataset(path, "pretrain")[0]["text"] == "第41行"
    path.write_bytes(path.read_bytes().replace(b"41", b"42"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p`, `rsync -a` and `tar x` leave it
    assert read_jsonl_dataset(path, "pretrain")[0]["text"] == "第42行"


def test_datasets_are_memory_mapped_arrow(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": f"第{i}行"} for i in range(50)])
    dataset = read_jsonl_dataset(path, "pretrain")
    assert dataset.cache_files and dataset.cache_files[0]["filename"].endswith(".arrow")


def test_length_grouped_batches_cover_every_row_once_with_less_padding():
    lengths = [(i * 37) % 100 + 1 for i in range(1000)]
    sampler = LengthGroupedBatches(lengths, batch_size=10, seed=1, group=10)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    naive = sum(max(lengths[i] for i in shuffled[s : s + 10]) * 10 for s in range(0, 1000, 10))
    assert padded < 0.7 * naive
    sampler.set_epoch(1)
    assert list(sampler) != batches
    ranks = [list(LengthGroupedBatches(lengths, 10, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    seen = [i for r in ranks for batch in r for i in batch]
    assert len(seen) == len(set(seen))


def test_collate_pads_right_and_masks(tokenizer):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    batch = collate(rows, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [5, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["tokens"] == 4  # real tokens, a plain int the training loop reads without touching a device
    from datasets import Dataset

    assert row_lengths(Dataset.from_list(rows)) == [3, 1]
