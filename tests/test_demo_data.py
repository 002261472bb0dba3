from minimind.data import StageData, count_records, load_stage_dataset
from minimind.demo import demo_data
from minimind.tokenizer import train_tokenizer

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
