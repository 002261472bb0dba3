import hashlib
import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from minimind import storage, tracking


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty store made once: MLflow's table migrations take ~2 s per new SQLite file, a copy ~1 ms."""
    database = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{database}").search_experiments()
    return database


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch, empty_store):
    """A fresh SQLite store per test; MLflow's process-wide state (URI, active experiment, env) is undone."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")  # recorded so teardown removes what set_experiment exports
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def model_dir(root: Path, marker: str) -> Path:
    """A stand-in model directory whose weights file differs per version."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (root / "weights.txt").write_text(marker)
    return root


def test_configure_creates_experiment_with_absolute_artifacts_under_the_store(store):
    experiment_id = tracking.configure("unit")
    experiment = MlflowClient().get_experiment(experiment_id)
    assert experiment.name == "unit"
    location = experiment.artifact_location.removeprefix("file://")
    assert Path(location).is_absolute()
    assert Path(location).resolve().is_relative_to(store.resolve())
    assert tracking.configure("unit") == experiment_id  # idempotent
    assert mlflow.get_experiment_by_name("unit").experiment_id == experiment_id


def test_configure_defaults_to_the_project_store_and_exports_it(store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY")
    mlflow.set_tracking_uri(None)
    assert tracking.PROJECT_ROOT == store.resolve()
    database = store.resolve() / "mlflow" / "store" / "mlflow.db"
    assert tracking.default_tracking_uri() == f"sqlite:///{database}"  # and creates the folder
    shutil.copy(store / "mlflow.db", database)
    experiment_id = tracking.configure()
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{database}" == tracking.default_tracking_uri()
    assert os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:////")
    assert database.is_file()
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    location = MlflowClient().get_experiment(experiment_id).artifact_location.removeprefix("file://")
    assert Path(location) == database.parent / "artifacts"


def test_relative_sqlite_uri_is_made_absolute(store, monkeypatch):
    monkeypatch.chdir(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    tracking.configure()
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{store / 'mlflow.db'}"


def test_latest_version_and_alias_and_run_references_resolve(store, tmp_path):
    tracking.configure("unit")
    with mlflow.start_run() as run:
        first = tracking.register_model_dir(model_dir(tmp_path / "v1", "one"), "minimind-unit", tags={"stage": "unit"})
        mlflow.log_artifacts(str(tmp_path / "v1"), "model")
        mlflow.log_artifacts(str(tmp_path / "v1"), "outer/inner")
    second = tracking.register_model_dir(model_dir(tmp_path / "v2", "two"), "minimind-unit", run_id=run.info.run_id, alias="best")
    assert (int(first.version), int(second.version)) == (1, 2)
    assert first.run_id == second.run_id == run.info.run_id
    assert first.tags == {"stage": "unit"}
    assert second.aliases == ["best"]

    def weights(reference):
        folder = tracking.resolve_model(reference, tmp_path / "downloads" / reference.replace("/", "_").replace(":", ""))
        assert (folder / "config.json").is_file()
        return (folder / "weights.txt").read_text()

    assert weights("models:/minimind-unit/latest") == "two"
    assert weights("models:/minimind-unit/1") == "one"
    assert weights("models:/minimind-unit@best") == "two"
    assert weights(f"runs:/{run.info.run_id}/model") == "one"
    assert weights(f"runs:/{run.info.run_id}/outer") == "one"  # the folder holding config.json is found
    default = tracking.resolve_model("models:/minimind-unit/1")  # no destination: a fresh folder, not the store
    assert (default / "weights.txt").read_text() == "one"
    assert not default.resolve().is_relative_to(store.resolve())


def test_plain_directory_resolves_to_itself_and_missing_path_raises(tmp_path, monkeypatch):
    folder = model_dir(tmp_path / "local", "x")
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_model("local") == folder.resolve()
    with pytest.raises(FileNotFoundError):
        tracking.resolve_model(str(tmp_path / "nowhere"))


def test_unknown_names_versions_and_aliases_say_what_exists(tmp_path):
    tracking.configure("unit")
    with pytest.raises(ValueError, match="no models are registered yet"):
        tracking.resolve_model("models:/minimind-sft/latest")
    tracking.register_model_dir(model_dir(tmp_path / "a", "a"), "minimind-pretrain", alias="best")
    tracking.register_model_dir(model_dir(tmp_path / "b", "b"), "minimind-dpo")
    with pytest.raises(ValueError, match="minimind-dpo, minimind-pretrain") as error:
        tracking.resolve_model("models:/minimind-sft/latest")
    assert "jobs/sft.py" in str(error.value)
    for name, job in (("minimind-grpo", "jobs/grpo.py"), ("minimind-clip-demo", "jobs/clip.py"),
                      ("minimind-vlm-pretrain", "jobs/pretrain_vlm.py"), ("minimind-vlm-sft", "jobs/sft_vlm.py")):
        with pytest.raises(ValueError, match=f"{name} is registered by {job} when it finishes"):
            tracking.resolve_model(f"models:/{name}/latest")
    with pytest.raises(ValueError, match="versions: 1"):
        tracking.resolve_model("models:/minimind-pretrain/7")
    with pytest.raises(ValueError, match="@best -> v1"):
        tracking.resolve_model("models:/minimind-pretrain@champion")
    with pytest.raises(ValueError, match="models:/NAME/latest"):
        tracking.resolve_model("models:/minimind-pretrain")


@pytest.mark.parametrize("alias", ["latest", "Latest", "v3", "V12", "has space"])
def test_refused_alias_registers_nothing(tmp_path, alias):
    tracking.configure("unit")
    tracking.register_model_dir(model_dir(tmp_path / "a", "a"), "minimind-sft")
    with pytest.raises(ValueError, match="alias"):
        tracking.register_model_dir(model_dir(tmp_path / "b", "b"), "minimind-sft", alias=alias)
    client = MlflowClient()
    assert [v.version for v in client.search_model_versions("name='minimind-sft'")] == [1]
    assert len(client.search_logged_models(experiment_ids=[mlflow.get_experiment_by_name("unit").experiment_id])) == 1


def test_failure_after_initialize_leaves_no_ready_model(tmp_path, monkeypatch):
    experiment_id = tracking.configure("unit")

    def broken(*args, **kwargs):
        raise RuntimeError("registry down")

    monkeypatch.setattr(mlflow, "register_model", broken)
    with pytest.raises(RuntimeError, match="registry down"):
        tracking.register_model_dir(model_dir(tmp_path / "a", "a"), "minimind-sft")
    models = MlflowClient().search_logged_models(experiment_ids=[experiment_id])
    assert [str(model.status) for model in models] == ["FAILED"]


def test_model_source_records_resolved_version(tmp_path):
    tracking.configure("unit")
    with mlflow.start_run() as run:
        tracking.register_model_dir(model_dir(tmp_path / "a", "a"), "minimind-sft", alias="best")
    tracking.register_model_dir(model_dir(tmp_path / "b", "b"), "minimind-sft")
    assert tracking.model_source("models:/minimind-sft/latest") == {
        "source.uri": "models:/minimind-sft/latest",
        "source.name": "minimind-sft",
        "source.version": "2",
    }
    assert tracking.model_source("models:/minimind-sft@best")["source.version"] == "1"
    assert tracking.model_source(f"runs:/{run.info.run_id}/model") == {
        "source.uri": f"runs:/{run.info.run_id}/model",
        "source.run_id": run.info.run_id,
    }
    assert tracking.model_source("/some/dir") == {"source.uri": "/some/dir"}


def test_loss_curve_and_samples_are_logged_to_the_run(tmp_path):
    tracking.configure("unit")
    history = {"train/loss": [(0, 4.0), (10, 3.0), (20, 2.5)], "val/loss": [(20, 2.8)]}
    with mlflow.start_run() as run:
        tracking.log_loss_curve(history)
        tracking.log_samples([{"prompt": "hi", "completion": "hello"}, {"prompt": "2+2", "score": 1.0}])
    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "out")))
    assert (downloaded / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((downloaded / "samples.json").read_text())
    assert table["columns"] == ["prompt", "completion", "score"]
    assert len(table["data"]) == 2


def test_file_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several chunks and a partial one
    path.write_bytes(data)
    assert storage.file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_git_commit(tmp_path, monkeypatch):
    from minimind.tracking.runs import CODE_CHECKOUT

    monkeypatch.setenv("MINIMIND_HOME", str(tmp_path))  # a home elsewhere moves the store, not the code
    commit = tracking.git_commit()
    if (CODE_CHECKOUT / ".git").exists():
        assert commit is not None and len(commit) == 40
    assert tracking.git_commit(tmp_path) is None  # not a checkout





def test_new_store_is_opened_under_the_lock(tmp_path, monkeypatch):
    """MLflow builds a new SQLite store's tables on first use, and processes doing that at once fail with
    "table ... already exists" (seen with 4 processes here). configure must open the store holding a lock
    file that other processes wait on; a second lock on the same file, even in-process, must not be free."""
    from filelock import FileLock, Timeout

    database = tmp_path / "fresh.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    held = []

    class Client(MlflowClient):
        def __init__(self, *args, **kwargs):
            try:
                FileLock(f"{database}.lock", timeout=0).acquire()
                held.append(False)
            except Timeout:
                held.append(True)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tracking.store, "MlflowClient", Client)  # where the store is opened
    assert tracking.configure("race") == "1"
    assert held and held[0]


def test_resume_finds_earlier_runs_in_local_folders_and_storage_uris(tmp_path):
    from minimind.driver.runner import _earlier_runs

    for name in ["pretrain-20261128-010000-1", "pretrain-20261128-020000-2", "sft-20261128-030000-3"]:
        (tmp_path / name).mkdir()
    assert _earlier_runs("pretrain", str(tmp_path)) == ["pretrain-20261128-010000-1", "pretrain-20261128-020000-2"]
    assert _earlier_runs("pretrain", f"file://{tmp_path}") == ["pretrain-20261128-010000-1", "pretrain-20261128-020000-2"]
    assert _earlier_runs("dpo", f"file://{tmp_path}/missing") == []


def test_pin_turns_latest_and_aliases_into_the_exact_version_and_resume_finds_it_again(mlflow_store, tmp_path):
    import mlflow
    from conftest import random_model

    from minimind.model.checkpoint import save_model

    tracking.configure("pin-test")
    save_model(random_model(), tmp_path / "m")
    tracking.register_model_dir(tmp_path / "m", "pin-model")
    tracking.register_model_dir(tmp_path / "m", "pin-model", alias="candidate")
    tracking.register_model_dir(tmp_path / "m", "pin-model")
    assert tracking.pin("models:/pin-model/latest") == "models:/pin-model/3"
    assert tracking.pin("models:/pin-model@candidate") == "models:/pin-model/2"
    assert tracking.pin(str(tmp_path / "m")) == str(tmp_path / "m")  # a directory stays what it is
    with mlflow.start_run(tags={"ray.run_name": "dpo-20260101-1", "lineage.init": "models:/pin-model/2"}):
        pass
    assert tracking.recorded_lineage("dpo-20260101-1") == {"lineage.init": "models:/pin-model/2"}
    assert tracking.recorded_lineage("never-ran") == {}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_registered_version_answers_through_mlflows_own_tools(tmp_path, byte_tokenizer):
    """Every registered version is an MLflow pyfunc model: `mlflow.pyfunc.load_model` answers a chat with
    the same greedy reply as the library, the registry has its chat signature, and `mlflow models serve`
    answers over HTTP."""
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import random_model

    from minimind.inference.generate import generate
    from minimind.model.checkpoint import save_model

    model = random_model("tiny", vocab_size=len(byte_tokenizer))
    save_model(model, tmp_path / "model", tokenizer=byte_tokenizer)
    tracking.configure("unit")
    version = tracking.register_model_dir(tmp_path / "model", "minimind-chat")
    uri = f"models:/minimind-chat/{version.version}"
    chat = {"messages": [{"role": "user", "content": "从前有座山"}]}
    replies = mlflow.pyfunc.load_model(uri).predict(chat, params={"max_tokens": 6})
    prompt = byte_tokenizer.apply_chat_template(chat["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = generate(
        model.to(torch.bfloat16), [list(prompt)], max_new_tokens=6, stop_token_ids=[byte_tokenizer.eos_token_id]
    )[0]
    assert replies == [byte_tokenizer.decode(expected, skip_special_tokens=True)]
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs.input_names() == ["messages", "tools"] and not signature.inputs.inputs[1].required  # tools: optional
    assert "max_tokens" in [param.name for param in signature.params.params]
    assert (tracking.resolve_model(uri, tmp_path / "resolved") / "model.safetensors").is_file()  # the stages' own view

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )  # its uvicorn
    try:
        body = json.dumps({"inputs": chat, "params": {"max_tokens": 6}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (
                    server.stderr.read().decode()[-2000:] if server.poll() is not None else "no answer in 120 s"
                )
                time.sleep(0.5)
        assert answer["predictions"] == replies
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_parent_run_groups_runs_and_is_closed_with_its_tables_or_as_failed():
    experiment_id = tracking.configure("unit")
    parent = tracking.start_parent_run(experiment_id, "pipeline-x", {"scale": 0.5})
    assert MlflowClient().get_run(parent).info.status == "RUNNING"
    with mlflow.start_run(run_name="stage", parent_run_id=parent) as child:
        pass
    tracking.end_parent_run(
        parent, {"pipeline/seconds": 12.0}, {"answers.json": [{"prompt": "你好", "sft": "你好。"}], "empty.json": []}
    )
    run = MlflowClient().get_run(parent)
    assert (
        run.info.status == "FINISHED" and run.data.params == {"scale": "0.5"} and run.data.metrics == {"pipeline/seconds": 12.0}
    )
    assert MlflowClient().get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent
    assert mlflow.load_table("answers.json", run_ids=[parent])["sft"].tolist() == ["你好。"]
    assert [a.path for a in MlflowClient().list_artifacts(parent)] == ["answers.json"]  # an empty table is not logged

    failed = tracking.start_parent_run(experiment_id, "pipeline-y")
    tracking.end_parent_run(failed, {}, {}, failed=True)
    assert MlflowClient().get_run(failed).info.status == "FAILED" and mlflow.active_run() is None


def _adapter_on_a_folder_base(root: Path, tokenizer) -> Path:
    """A LoRA adapter folder whose adapter_config.json names a base model folder."""
    from conftest import random_model

    from minimind.model.checkpoint import save_model
    from minimind.model.lora import LoRAConfig, add_lora, save_adapter

    save_model(random_model("tiny", vocab_size=len(tokenizer)), root / "base", tokenizer=tokenizer)
    config = LoRAConfig(rank=2, base=str(root / "base"))
    return save_adapter(add_lora(random_model("tiny", vocab_size=len(tokenizer)), config), root / "adapter", config, tokenizer)


def test_loading_an_adapter_leaves_no_temporary_folder_behind(tmp_path, monkeypatch, byte_tokenizer):
    """The pyfunc loader of an adapter version and `resolved_model` merge into a temporary folder that is
    gone once the model is loaded; resolve_model without a destination writes everything into the one
    temporary folder the caller then owns (it left four per pyfunc load)."""
    import tempfile

    from minimind.tracking.pyfunc import load_predictor

    adapter = _adapter_on_a_folder_base(tmp_path, byte_tokenizer)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    replies = load_predictor(adapter).predict({"messages": [{"role": "user", "content": "hello"}]}, params={"max_tokens": 3})
    assert len(replies) == 1 and isinstance(replies[0], str)
    assert list(scratch.glob("minimind-*")) == []  # (torch may put its caches there)
    with tracking.resolved_model(str(adapter)) as merged:
        assert (merged / "model.safetensors").is_file()
    assert list(scratch.glob("minimind-*")) == []
    merged = tracking.resolve_model(str(adapter))
    assert (merged / "model.safetensors").is_file() and list(scratch.glob("minimind-*")) == [merged.parent]


def test_a_reference_mlflow_cannot_find_is_one_line_naming_it_and_merge_lora_cleans_up(tmp_path, monkeypatch, capsys):
    import tempfile

    from minimind.cli import main

    tracking.configure("unit")
    missing_run = "runs:/0123456789abcdef0123456789abcdef/adapter"
    with pytest.raises(
        FileNotFoundError, match=f"^{missing_run} was not found: Run with id=0123456789abcdef0123456789abcdef not found$"
    ):
        tracking.resolve_model(missing_run, tmp_path / "download")
    with mlflow.start_run() as run:
        mlflow.log_text("{}", "other/config.json")
    with pytest.raises(FileNotFoundError, match=f"runs:/{run.info.run_id}/adapter was not found: .*'adapter'"):
        tracking.resolve_model(f"runs:/{run.info.run_id}/adapter", tmp_path / "download")

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(SystemExit) as stopped:
        main(["merge-lora", missing_run, str(tmp_path / "merged")])
    assert (
        str(stopped.value)
        == f"minimind merge-lora: {missing_run} was not found: Run with id=0123456789abcdef0123456789abcdef not found"
    )
    assert list(scratch.glob("minimind-*")) == [] and not (tmp_path / "merged").exists()


def test_an_mlflow_error_in_a_command_is_one_line_not_a_traceback(tmp_path, byte_tokenizer):
    from conftest import random_model

    from minimind.cli import main

    torch.save(random_model("tiny", vocab_size=len(byte_tokenizer)).state_dict(), tmp_path / "model.pth")
    byte_tokenizer.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(SystemExit) as stopped:
        main(
            [
                "import",
                str(tmp_path / "model.pth"),
                str(tmp_path / "imported"),
                "--tokenizer",
                str(tmp_path / "tokenizer"),
                "--preset",
                "tiny",
                "--config-overrides",
                f"vocab_size={len(byte_tokenizer)}",
                "--register-as",
                "a/b",
            ]
        )
    assert str(stopped.value).startswith("minimind import: Invalid model name ('a/b') provided.") and "\n" not in str(
        stopped.value
    )


def test_an_error_message_is_one_line_even_when_it_is_empty():
    from mlflow.exceptions import MlflowException

    from minimind.tracking import first_line

    assert (
        first_line(MlflowException("RESOURCE_DOES_NOT_EXIST: no such run\nTraceback ..."))
        == "RESOURCE_DOES_NOT_EXIST: no such run"
    )
    assert first_line(MlflowException("")) == "MlflowException"  # an IndexError before: the traceback it was meant to avoid
