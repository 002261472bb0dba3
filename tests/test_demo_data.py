from minimind.data.rows import StageData, count_records, load_stage_dataset
from minimind.demo import demo_data
from minimind.model.tokenizer import train_tokenizer

KIND_OF = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo", "reason": "reason", "vlm_pretrain": "vlm", "vlm_sft": "vlm"}


def test_demo_files_are_written_once_and_all_load_as_their_stage(tmp_path):
    paths = demo_data(root=tmp_path)
    assert demo_data(root=tmp_path) == paths  # the second call reuses the folder
    assert paths["images"].is_dir() and all(p.is_absolute() for p in paths.values())
    texts = [line for line in paths["pretrain"].read_text(encoding="utf-8").splitlines()[:2000]]
    tokenizer = train_tokenizer(texts, vocab_size=800)
    for name, kind in KIND_OF.items():
        for split in (name, f"{name}_eval"):
            rows = load_stage_dataset(paths[split], tokenizer, StageData(kind, seq_len=512, image_tokens=4))
            assert len(rows) > 0, split
            if kind != "pretrain":
                assert len(rows) == count_records(paths[split]), f"{split}: rows lost to validation or truncation"


def test_demo_tokenizer_knows_every_word_of_the_demo_and_pretraining_describes_pictures(tmp_path):
    import json

    from minimind.demo import demo_tokenizer
    from minimind.demo.images import caption, eval_scenes, picture_descriptions
    from minimind.model.tokenizer import load_tokenizer

    paths = demo_data(root=tmp_path)
    tokenizer = load_tokenizer(demo_tokenizer(root=tmp_path))
    # words that only the later stages use are whole characters, not bytes: trained on every training text
    for text in ("请问安乐喜欢的动物是什么？", "556加上623是多少？", "图中有几个星形？"):
        pieces = [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        assert pieces == list(text), pieces
    descriptions = picture_descriptions()
    pretraining = {json.loads(line)["text"] for line in paths["pretrain"].read_text(encoding="utf-8").splitlines()}
    assert set(descriptions) <= pretraining
    assert not set(descriptions) & {caption(scene) for scene in eval_scenes().values()}  # no held-out picture is described

    # the template's tool text is in the vocabulary too: every tool conversation fits the tools stage's rows, whole
    from minimind.data.rows import iter_jsonl
    from minimind.training.configs import ToolsConfig

    lengths = [len(tokenizer.apply_chat_template(record["conversations"], tools=record.get("tools"), tokenize=True,
                                                 return_dict=False))
               for split in ("tools", "tools_eval", "tools_rl") for _, record in iter_jsonl(paths[split], "sft")]
    assert len(lengths) == 3124 and max(lengths) <= ToolsConfig.seq_len, max(lengths)
