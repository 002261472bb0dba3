import pytest

from minimind.model.tokenizer import DEFAULT_SYSTEM_PROMPT, SPECIAL_TOKENS, Markers, load_tokenizer, train_tokenizer

CORPUS = [
    "从前有座山，山里有座庙，庙里有个老和尚。",
    "MiniMind is a tiny language model. 它很小，但是能说话。",
    "今天天气很好 ☀️，我们去公园散步吧！🌳🐶",
    "1 + 1 = 2，2 × 3 = 6。",
] * 30


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=600)


@pytest.mark.parametrize("text", [
    "从前有座山，山里有座庙。", "Hello, MiniMind!  two  spaces\nand a newline", "emoji 🚀🌳 and 表情 😀", "未见过的字：鑫龘", "",
])
def test_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_have_fixed_single_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for token in SPECIAL_TOKENS:
        assert tokenizer(f"好{token}好", add_special_tokens=False)["input_ids"].count(tokenizer.convert_tokens_to_ids(token)) == 1
    markers = Markers.of(tokenizer)
    assert len(set(markers.ids(tokenizer).values())) == 5


def test_chat_template_renders_minimind2_byte_for_byte(tokenizer):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "用户提问"}, {"role": "assistant", "content": "回答"}], tokenize=False
    )
    assert rendered == (
        "<s>system\n你是 MiniMind，是一个有用的人工智能助手。</s>\n"
        "<s>user\n用户提问</s>\n"
        "<s>assistant\n回答</s>\n"
    )
    assert DEFAULT_SYSTEM_PROMPT == "你是 MiniMind，是一个有用的人工智能助手。"


def test_generation_prompt_and_own_system_prompt(tokenizer):
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == "<s>system\n你是助手。</s>\n<s>user\n你好</s>\n<s>assistant\n"


def test_saved_directory_loads_offline_with_autotokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    for reloaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert reloaded("你好 <think> world")["input_ids"] == tokenizer("你好 <think> world")["input_ids"]
        assert reloaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<s>system\n")
        assert Markers.of(reloaded) == Markers()


def test_markers_come_from_the_tokenizer_not_the_code(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    own_markers = ["<|im_start|>", "<|im_end|>", "<|think|>", "<|/think|>", "<|ans|>", "<|/ans|>", "<|img|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(
        ["hello world"] * 5,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=own_markers, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    names = dict(think_start="<|think|>", think_end="<|/think|>", answer_start="<|ans|>", answer_end="<|/ans|>", image="<|img|>")
    user_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", extra_special_tokens=names)
    user_tokenizer.save_pretrained(tmp_path)
    markers = Markers.of(load_tokenizer(tmp_path))
    assert markers == Markers(**names)
    assert markers.ids(user_tokenizer)["image"] == own_markers.index("<|img|>")
    with pytest.raises(ValueError, match="no single token"):
        Markers().ids(user_tokenizer)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_a_minimind_layout_tokenizer_serves_a_text_model_and_names_what_a_vlm_needs(byte_tokenizer, tmp_path):
    """MiniMind's own tokenizers have no <image> token: a text model never needs one; a VLM says what to set,
    and a marker named in the tokenizer's config travels with the model folder."""
    from conftest import random_model

    from minimind.model.checkpoint import save_model
    from minimind.serve.engine import ChatModel

    save_model(random_model("tiny", vocab_size=len(byte_tokenizer)), tmp_path / "model", tokenizer=byte_tokenizer)
    assert ChatModel(tmp_path / "model").engine.suppress_token_ids == []
    with pytest.raises(ValueError, match=r"'<image>' is not a single token.*--markers image="):
        Markers.of(byte_tokenizer).image_id(byte_tokenizer)

    tokenizer = load_tokenizer(tmp_path / "model")
    Markers.configure(tokenizer, {"image": "</s>", "think_start": "<s>"})
    tokenizer.save_pretrained(tmp_path / "configured")
    reloaded = load_tokenizer(tmp_path / "configured")
    assert Markers.of(reloaded).image_id(reloaded) == reloaded.eos_token_id
    assert Markers.of(reloaded).tag_sequences(reloaded)[0] == [reloaded.bos_token_id]
    with pytest.raises(ValueError, match="unknown marker"):
        Markers.configure(reloaded, {"imgae": "<s>"})


def test_split_digits_and_han_keep_words_and_numbers_apart(tmp_path):
    corpus = ["安乐最喜欢的颜色是红色。安乐住在北京。", "600+334=934，写4，进1。"] * 50
    merged = train_tokenizer(corpus, vocab_size=400)
    split = train_tokenizer(corpus, vocab_size=400, split_digits=True, split_han=True)

    def pieces(tokenizer, text):
        return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    text = "安乐最喜欢的颜色是红色。600+334=934"
    assert any(len(piece) > 2 for piece in pieces(merged, text))  # without: phrase and number tokens
    assert pieces(split, text) == list(text)  # with: one token per character and per digit
    split.save_pretrained(str(tmp_path))
    assert load_tokenizer(tmp_path).decode(load_tokenizer(tmp_path)(text)["input_ids"]) == text  # the pre-tokenizer is saved
