import os
import tempfile

import pytest
import torch

# Keep `datasets`' Arrow cache out of the user's home and fresh for every run.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="minimind-test-datasets-"))

from minimind.model.config import ModelConfig
from minimind.model.model import MiniMindForCausalLM


def pytest_sessionfinish(session, exitstatus):
    # "No tests collected" (exit 5) must fail CI, not pass it silently.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def random_model(preset: str = "tiny", seed: int = 0, std: float = 0.2, **overrides) -> MiniMindForCausalLM:
    """A tiny model with weights large enough that its logits and greedy choices are far from ties
    (the default 0.02 init makes every position predict its own input)."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(ModelConfig.from_name(preset, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.normal_(0, std)
    return model.eval()


@pytest.fixture
def tiny_model():
    return random_model()


def memorized_model(tokenizer, messages: list[dict], reply: str, max_steps: int = 400, tools: list[dict] | None = None,
                    also: tuple = (), **overrides) -> MiniMindForCausalLM:
    """A tiny model trained (seconds) until it answers `messages` with `reply` and its end-of-turn token (and
    each (messages, reply, tools) of `also`): a model that really emits, say, a reasoning reply or a tool call,
    for tests of what consumes one. The prompt is the one every user of a model builds (its tokenizer's
    template, `tools` listed, opening a think block if the tokenizer says so)."""
    from minimind.inference.chat import chat_prompt_ids

    rows = []
    for example_messages, example_reply, example_tools in ((messages, reply, tools), *also):
        prompt = chat_prompt_ids(tokenizer, example_messages, example_tools)
        answer = tokenizer.encode(example_reply, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append((prompt + answer, len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row, _ in rows])
    labels = ids.clone()
    for index, (row, prompt_length) in enumerate(rows):
        labels[index, :prompt_length] = -100
        labels[index, len(row):] = -100
    torch.manual_seed(0)
    model = MiniMindForCausalLM(ModelConfig.from_name("tiny", vocab_size=len(tokenizer), **overrides))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(max_steps * len(rows)):
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.01, f"did not memorise the replies: loss {loss.item():.3f}"
    return model.eval()


CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A small byte-level BPE tokenizer (ids 0/1/2 = <unk>/<s>/</s>, as in MiniMind) with a ChatML-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(["从前有座山，山里有座庙。", "hello world, hello minimind"] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every Ray-based test (starting Ray costs seconds)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MINIMIND_DEMO_DIR", tempfile.mkdtemp(prefix="minimind-test-demo-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def fast_train_polls(monkeypatch):
    """Ray Train's controller polls its workers every 2 s, and a stage of a few steps waits for several polls (worker
    group up, training done): at 0.25 s the LoRA job test took 80 s instead of 98 here. The driver passes the variable
    on to the controller. Not for the kill tests: there a killed job's worker trained on to its last step more often."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def mlflow_store(ray_cluster, tmp_path_factory, monkeypatch_module):
    """A project folder and MLflow store of the test module's own: its registered versions start at 1."""
    home = tmp_path_factory.mktemp("minimind-home")
    monkeypatch_module.setenv("MINIMIND_HOME", str(home))
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    return home


def mlflow_client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()
