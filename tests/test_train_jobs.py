"""Real Ray Train runs of the stage jobs on tiny settings: resume, faults, bad input, DDP, `ray job submit`, the
VLM stages. Every stage's registration and hand-over is checked on the pipeline's run (tests/test_pipeline.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


from conftest import mlflow_client as client  # noqa: E402

from minimind.data.rows import DataFormatError  # noqa: E402
from minimind.driver.runner import run_stage  # noqa: E402
from minimind.model.checkpoint import load_model  # noqa: E402
from minimind.training.configs import PretrainConfig, SFTConfig, VLMConfig, VLMSFTConfig  # noqa: E402

QUICK = dict(max_steps=4, checkpoint_every=2, log_every=1, eval_limit=4, batch_size=4, seq_len=128, preset="tiny")


def versions(name):
    return sorted(int(v.version) for v in client().search_model_versions(f"name='{name}'"))


def test_resume_continues_exactly_where_it_stopped_never_from_a_torn_checkpoint(mlflow_store, tmp_path, fast_train_polls):
    storage = str(tmp_path / "ray")
    straight = run_stage(PretrainConfig(**{**QUICK, "max_steps": 6, "checkpoint_every": 3}), "pretrain")
    stopped = run_stage(
        PretrainConfig(**{**QUICK, "max_steps": 6, "checkpoint_every": 3, "stop_after": 3, "storage_path": storage}), "pretrain"
    )
    assert stopped.model_uri == ""  # nothing registered for an unfinished run
    (run_dir,) = Path(storage).glob("pretrain-*")
    complete = max(path for path in run_dir.glob("checkpoint_*") if path.is_dir())
    torn = run_dir / "checkpoint_2099-01-01_00-00-00.000000"  # newer by name, and cut off mid-write
    torn.mkdir()
    for path in complete.iterdir():
        (torn / path.name).write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    resumed = run_stage(
        PretrainConfig(**{**QUICK, "max_steps": 6, "checkpoint_every": 3, "resume": True, "storage_path": storage}), "pretrain"
    )
    resumed_run = client().get_model_version("minimind-pretrain", resumed.model_uri.rsplit("/", 1)[1]).run_id
    assert [m.step for m in client().get_metric_history(resumed_run, "train/loss")] == [4, 5, 6]  # none twice, none skipped
    a, b = load_model(straight.model_dir).state_dict(), load_model(resumed.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same weights as the uninterrupted run


def test_bad_data_fails_before_training_and_registers_nothing(mlflow_store, tmp_path):
    bad = tmp_path / "sft.jsonl"
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps(good) + "\n" + '{"conversations": [{"role": "robot", "content": "x"}]}\n')
    before = versions("minimind-sft")
    with pytest.raises(DataFormatError, match=r"sft.jsonl:2: .*role 'robot'"):
        run_stage(SFTConfig(**{**QUICK, "data": str(bad)}), "sft")
    bad.write_text(json.dumps(good) + "\n")
    with pytest.raises(SystemExit, match=r"sft.jsonl: no training rows from its 1 records at --seq-len 4 .*raise --seq-len"):
        run_stage(SFTConfig(**{**QUICK, "data": str(bad), "seq_len": 4}), "sft")  # the reply cannot fit: nothing to train on
    assert versions("minimind-sft") == before


def test_real_data_never_falls_back_to_the_demo_tokenizer(mlflow_store, tmp_path):
    (tmp_path / "pretrain.jsonl").write_text('{"text": "小明喜欢红色。"}\n')
    with pytest.raises(SystemExit, match="--data without --tokenizer"):
        run_stage(PretrainConfig(**{**QUICK, "data": str(tmp_path / "pretrain.jsonl")}), "pretrain")


def test_unknown_init_names_the_registered_models(mlflow_store):
    with pytest.raises(ValueError, match="minimind-pretrain"):
        run_stage(SFTConfig(**{**QUICK, "init": "models:/no-such-model/latest"}), "sft")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ray_job_submit_trains_into_the_same_mlflow_store(mlflow_store, tmp_path):
    """The way users run it: `ray start --head`, then `ray job submit -- python jobs/pretrain.py`."""
    import os
    import signal
    import subprocess
    import tempfile
    import time
    import urllib.request

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    dashboard = _free_port()
    short_temp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={_free_port()}",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={short_temp}",
            # every fixed default port of a second node on this machine, away from the tests' own Ray
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
        ],
        env=env,
        stdout=(tmp_path / "head.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while True:  # the job server answers a few seconds after the head starts
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise RuntimeError("the Ray head did not start:\n" + (tmp_path / "head.log").read_text()[-3000:]) from None
                time.sleep(1)
        before = versions("minimind-pretrain")
        runtime_env = {
            "env_vars": {key: os.environ[key] for key in ("MLFLOW_TRACKING_URI", "MINIMIND_HOME", "MINIMIND_DEMO_DIR")}
        }
        command = [
            str(bin_dir / "ray"),
            "job",
            "submit",
            f"--address={address}",
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "jobs/pretrain.py",
            "--max-steps",
            "2",
            "--checkpoint-every",
            "2",
            "--preset",
            "tiny",
            "--batch-size",
            "4",
            "--seq-len",
            "128",
            "--eval-limit",
            "4",
            "--experiment",
            "submitted",
        ]
        while True:  # the job agent comes up a little after the dashboard; it says so explicitly
            submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in submitted.stderr or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert "registered models:/minimind-pretrain/" in submitted.stdout
        new = sorted(set(versions("minimind-pretrain")) - set(before))
        assert len(new) == 1
        run = client().get_run(client().get_model_version("minimind-pretrain", str(new[0])).run_id)
        assert client().get_experiment(run.info.experiment_id).name == "submitted"
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)  # the head's own process group: this cluster only
        head.wait(timeout=60)


def test_a_killed_worker_is_restarted_and_resumes_from_its_checkpoint(mlflow_store, tmp_path):
    """SIGKILL the training worker after a checkpoint: Ray restarts it, it resumes from that checkpoint,
    and the model ends where an uninterrupted run ends. (Killing it while the first checkpoint is still
    being written makes Ray restart from scratch: a half-written checkpoint is never used.)"""
    import os
    import signal
    import threading
    import time

    import psutil

    settings = {
        **QUICK,
        "preset": "demo",
        "batch_size": 16,
        "seq_len": 256,
        "max_steps": 30,
        "checkpoint_every": 5,
        "log_every": 5,
    }
    storage = tmp_path / "ray"
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            # Ray Train writes this file when its controller has registered a reported checkpoint; a checkpoint
            # folder alone is not enough (killed before the controller saw it, the run restarts from scratch)
            if any(storage.glob("*/checkpoint_manager_snapshot.json")):
                for process in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in part for part in process.info["cmdline"] or []):
                        os.kill(process.pid, signal.SIGKILL)  # Ray titles each worker process ray::RayTrainWorker...
                        killed.append(process.pid)
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    interrupted = run_stage(PretrainConfig(**settings, storage_path=str(storage), max_failures=2), "pretrain")
    watcher.join()
    assert killed, "the worker finished before it could be killed"
    straight = run_stage(PretrainConfig(**settings, storage_path=str(tmp_path / "straight")), "pretrain")
    a, b = load_model(straight.model_dir).state_dict(), load_model(interrupted.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    name, version = interrupted.model_uri.removeprefix("models:/").split("/")
    assert int(version) == max(versions(name)) - 1  # the interrupted run registered exactly one version
    steps = [m.step for m in client().get_metric_history(client().get_model_version(name, version).run_id, "train/loss")]
    assert steps.count(1) == 1 and steps[-1] == 30, str(steps)  # resumed from the checkpoint, not restarted from scratch


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(mlflow_store, tmp_path):
    from conftest import random_model

    from minimind.demo import demo_tokenizer
    from minimind.model.checkpoint import save_model
    from minimind.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(demo_tokenizer())
    save_model(random_model(vocab_size=100), tmp_path / "small", tokenizer=tokenizer)
    with pytest.raises(SystemExit, match=f"has {len(tokenizer)} tokens but the model only 100"):
        run_stage(SFTConfig(**{**QUICK, "init": str(tmp_path / "small")}), "sft")


def test_vlm_stages_train_what_each_should_and_never_the_vision_tower(mlflow_store, tmp_path, fast_train_polls):
    """With minimind-3v's options (MiniMind-V's defaults run in the pipeline test): the MLP projector, the patch
    grid pooled to 4 tokens, and in VLM SFT the language model's first and last blocks only."""
    from conftest import random_model

    from minimind.demo import demo_tokenizer, demo_vision_tower
    from minimind.model.checkpoint import save_model
    from minimind.model.tokenizer import load_tokenizer
    from minimind.model.vision import build_vlm, load_vlm

    tokenizer = load_tokenizer(demo_tokenizer())
    save_model(random_model(vocab_size=len(tokenizer), std=0.02, num_hidden_layers=3), tmp_path / "llm", tokenizer=tokenizer)
    m3v = {"projector": "mlp", "image_tokens": 4}
    fresh, _ = build_vlm(tmp_path / "llm", demo_vision_tower(), seed=0, **m3v)  # what the stage starts from

    def same(a, b):
        a, b = a.state_dict(), b.state_dict()
        return all(torch.equal(a[k], b[k]) for k in a)

    pretrain = run_stage(
        VLMConfig(**{**QUICK, "init": str(tmp_path / "llm"), "storage_path": str(tmp_path / "ray"), **m3v}), "vlm_pretrain"
    )
    assert pretrain.model_uri == "models:/minimind-vlm-pretrain/1"
    checkpoints = list((tmp_path / "ray").glob("vlm_pretrain-*/checkpoint_*"))
    assert checkpoints and not any((checkpoint / "vision").exists() for checkpoint in checkpoints)  # the frozen tower: referenced
    assert (pretrain.model_dir / "vision" / "config.json").is_file()  # ... and copied once, into the registered model
    aligned = load_vlm(pretrain.model_dir)
    assert same(aligned.language_model, fresh.language_model)  # frozen: bit-identical
    assert not same(aligned.projection, fresh.projection)
    assert same(aligned.vision_tower, fresh.vision_tower)

    # MiniMind-V's Parquet (images as bytes, prepared by Ray Data); evaluation on the demo's JSONL and image files
    from test_parquet import parquet_of

    from minimind.demo import demo_data

    demo = demo_data(0)
    parquet = parquet_of(demo["vlm_sft"], demo["images"], tmp_path / "vlm_sft.parquet")
    sft = run_stage(  # default --init: the VLM registered just above
        VLMSFTConfig(**QUICK, data=str(parquet), eval_data=str(demo["vlm_sft_eval"]), images=str(demo["images"]),
                     train_llm="first-last"),
        "vlm_sft",
    )
    run = client().get_run(client().get_model_version("minimind-vlm-sft", "1").run_id)
    assert run.data.tags["source.name"] == "minimind-vlm-pretrain"
    assert run.data.params["data"] == str(parquet)
    assert (Path(run.data.tags["data.prepared"]) / "shard-00000" / "image_bytes.npy").is_file()
    tuned = load_vlm(sft.model_dir)
    assert (tuned.projector, tuned.image_tokens) == ("mlp", 4) and not same(tuned.projection, aligned.projection)
    before, after = aligned.language_model.state_dict(), tuned.language_model.state_dict()
    changed = {name.split(".")[2] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"0", "2"}  # model.layers.<i>.: the first and last of 3 blocks, nothing else
    assert same(tuned.vision_tower, fresh.vision_tower)
    assert sft.after["eval/heldout_loss"] < sft.before["eval/heldout_loss"]
    assert "eval/image_question_accuracy" in sft.after and "eval_before/image_question_accuracy" in run.data.metrics
    samples = json.loads(Path(client().download_artifacts(run.info.run_id, "samples.json", str(tmp_path))).read_text())
    assert {"image", "prompt", "reply", "reference"} <= set(samples["columns"])
    artifacts = {a.path for a in client().list_artifacts(run.info.run_id)}
    assert "sample_images.json" in artifacts and "table_images" in artifacts  # the pictures, as PNG files


def test_vlm_data_naming_a_missing_image_fails_before_training(mlflow_store, tmp_path):
    from conftest import random_model

    from minimind.demo import demo_tokenizer, demo_vision_tower
    from minimind.model.checkpoint import save_model
    from minimind.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(demo_tokenizer())
    save_model(random_model(vocab_size=len(tokenizer)), tmp_path / "llm", tokenizer=tokenizer)
    record = {
        "conversations": [{"role": "user", "content": "<image>\n这是什么？"}, {"role": "assistant", "content": "圆形。"}],
        "image": "missing.png",
    }
    (tmp_path / "vlm.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n")
    with pytest.raises(SystemExit, match="needs --vision-model"):  # real data never falls back to the demo's random tower
        run_stage(VLMConfig(**{**QUICK, "data": str(tmp_path / "vlm.jsonl"), "init": str(tmp_path / "llm")}), "vlm_pretrain")
    with pytest.raises(SystemExit, match=r"1 image\(s\) named in .*vlm.jsonl are not under .*missing.png"):
        run_stage(
            VLMConfig(
                **{
                    **QUICK,
                    "data": str(tmp_path / "vlm.jsonl"),
                    "init": str(tmp_path / "llm"),
                    "vision_model": str(demo_vision_tower()),
                }
            ),
            "vlm_pretrain",
        )


def test_vlm_sft_on_text_only_batches_with_two_ddp_workers_and_a_linked_tower(mlflow_store, tmp_path, fast_train_polls):
    """MiniMind-V mixes text-only samples into VLM SFT: a micro-batch without images must not leave the
    projection out of DDP's step. With --link-vision no checkpoint and no registered version copies the tower."""
    from conftest import random_model

    from minimind import tracking
    from minimind.demo import demo_tokenizer, demo_vision_tower
    from minimind.model.checkpoint import save_model
    from minimind.model.tokenizer import load_tokenizer
    from minimind.model.vision import VISION_CONFIG_NAME, VisionConfig

    tokenizer = load_tokenizer(demo_tokenizer())
    save_model(random_model(vocab_size=len(tokenizer), std=0.02), tmp_path / "llm", tokenizer=tokenizer)
    records = [
        {"conversations": [{"role": "user", "content": f"小明几岁？{i}"}, {"role": "assistant", "content": "十岁。"}]}
        for i in range(16)
    ]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    storage = tmp_path / "ray"
    result = run_stage(
        VLMSFTConfig(
            **{
                **QUICK,
                "init": str(tmp_path / "llm"),
                "data": str(tmp_path / "text.jsonl"),
                "vision_model": str(demo_vision_tower()),
                "num_workers": 2,
                "cpus_per_worker": 1,
                "batch_size": 2,
                "max_steps": 3,
                "checkpoint_every": 1,
                "max_failures": 0,
                "link_vision": True,
                "storage_path": str(storage),
            }
        ),
        "vlm_sft",
    )
    assert result.model_uri.startswith("models:/minimind-vlm-sft/")
    run = client().get_run(client().get_model_version("minimind-vlm-sft", result.model_uri.rsplit("/", 1)[1]).run_id)
    assert run.data.params["num_workers"] == "2"  # a DDP job of two workers
    checkpoints = list(storage.glob("vlm_sft-*/checkpoint_*"))
    assert checkpoints and not any((checkpoint / "vision").exists() for checkpoint in checkpoints)
    registered = tracking.resolve_model(result.model_uri, tmp_path / "registered")  # the version's model folder
    for directory in (result.model_dir, registered):
        assert not (directory / "vision").exists()
        assert VisionConfig.load(directory / VISION_CONFIG_NAME).vision_model == str(Path(demo_vision_tower()).resolve())
