"""`minimind eval`: our model behind lm-evaluation-harness's LM interface, local tasks in the harness's own format,
and the scores on the model's MLflow run. Real harness, real tasks, tiny models."""

import json

import pytest
import torch
from conftest import memorized_model, mlflow_client, random_model
from lm_eval.api.instance import Instance

from minimind.inference.chat import Chat
from minimind.inference.harness import HarnessLM

QUESTIONS = [("hello minimind", "从前有座山"), ("从前有座山", "hello world")]

MC_YAML = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

GENERATION_YAML = """task: local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{reply}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 24
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def answering(byte_tokenizer):
    """A model that answers each of QUESTIONS with its reply (as a chat turn)."""
    (question, reply), *others = QUESTIONS
    also = tuple(([{"role": "user", "content": q}], r, None) for q, r in others)
    return Chat(memorized_model(byte_tokenizer, [{"role": "user", "content": question}], reply, also=also), byte_tokenizer)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The two local tasks over QUESTIONS: pick the memorised reply among four, and write it."""
    folder = tmp_path_factory.mktemp("tasks")
    decoys = ["山里有座庙", "minimind", "庙里有座山"]  # none a prefix of a reply (a prefix scores at least as high)
    docs = [{"question": q, "reply": r, "choices": sorted([r, *decoys]), "answer": sorted([r, *decoys]).index(r)}
            for q, r in QUESTIONS]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (folder / "local_mc.yaml").write_text(MC_YAML.format(data=json.dumps(str(folder / "docs.jsonl"))), encoding="utf-8")
    (folder / "local_gen.yaml").write_text(GENERATION_YAML.format(data=json.dumps(str(folder / "docs.jsonl"))), encoding="utf-8")
    return folder


def test_loglikelihood_is_the_continuations_log_probability_alone_or_in_a_batch(byte_tokenizer):
    model = random_model(vocab_size=len(byte_tokenizer))
    harness = HarnessLM(Chat(model, byte_tokenizer), batch_size=3)
    pairs = [("从前有座山，", "山里有座庙。"), ("hello", " world, hello minimind"), ("hello world", ",")]
    scored = harness.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (logprob, _) in zip(pairs, scored):
        context_ids, continuation_ids = harness.context_and_continuation(context, continuation)
        assert context_ids + continuation_ids == byte_tokenizer.encode(context + continuation, add_special_tokens=False)
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        expected = sum(logprobs[len(context_ids) - 1 + k, token].item() for k, token in enumerate(continuation_ids))
        assert logprob == pytest.approx(expected, abs=1e-4)  # padded beside longer rows, the same as alone
    context = byte_tokenizer.encode("从前有座山", add_special_tokens=False)
    with torch.no_grad():
        greedy = model(torch.tensor([context])).logits[0, -1].argmax().item()
    other = (greedy + 1) % len(byte_tokenizer)
    assert [flag for _, flag in harness.scored([(context, [greedy]), (context, [other])])] == [True, False]


def test_local_tasks_run_through_the_harness_on_a_model_that_knows_their_answers(answering, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks))
    knows = simple_evaluate(model=HarnessLM(answering), tasks=["local_mc", "local_gen"], task_manager=manager,
                            apply_chat_template=True, bootstrap_iters=0)["results"]
    assert knows["local_mc"]["acc,none"] == 1.0 and knows["local_gen"]["exact_match,none"] == 1.0
    guessing = Chat(random_model(vocab_size=len(answering.tokenizer)), answering.tokenizer)
    guesses = simple_evaluate(model=HarnessLM(guessing), tasks=["local_gen"], task_manager=manager,
                              apply_chat_template=True, bootstrap_iters=0)["results"]
    assert guesses["local_gen"]["exact_match,none"] == 0.0


def test_minimind_eval_logs_the_scores_on_the_registered_versions_run(answering, tasks, mlflow_store, tmp_path, capsys):
    from minimind import cli, tracking
    from minimind.model.checkpoint import save_model

    folder = save_model(answering.model, tmp_path / "answering", answering.tokenizer)
    tracking.configure()
    import mlflow

    with mlflow.start_run(run_name="answering") as run:
        version = tracking.register_model_dir(folder, "harness-answering", run_id=run.info.run_id)
    cli.main(["eval", f"models:/harness-answering/{version.version}", "--tasks", "local_mc,local_gen",
              "--include-path", str(tasks), "--output", str(tmp_path / "results.json")])
    assert "local_mc" in capsys.readouterr().out
    logged = mlflow_client().get_run(run.info.run_id)
    assert logged.data.metrics["harness/local_mc/acc"] == 1.0 and logged.data.metrics["harness/local_gen/exact_match"] == 1.0
    assert logged.data.tags["harness.tasks"] == "local_mc,local_gen"
    results = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/harness/results.json"))
    assert results["results"] == json.loads((tmp_path / "results.json").read_text())["results"]

    cli.main(["eval", str(folder), "--tasks", "local_mc", "--include-path", str(tasks)])  # a folder: a run of its own
    own = mlflow_client().search_runs([logged.info.experiment_id], "tags.`harness.model` = '%s'" % folder)
    assert len(own) == 1 and own[0].info.run_name == "eval-answering" and own[0].data.metrics["harness/local_mc/acc"] == 1.0

    with pytest.raises(SystemExit, match="unknown harness task.*no_such_task"):
        cli.main(["eval", str(folder), "--tasks", "no_such_task", "--include-path", str(tasks), "--no-log"])


def test_the_demo_tasks_ask_every_fact_in_a_held_out_phrasing_and_the_held_out_additions(ray_cluster):
    from lm_eval.tasks import TaskManager

    from minimind.demo import demo_data
    from minimind.demo.world import HELD_OUT_QUESTIONS, build_world

    harness = demo_data(0)["harness"]
    manager = TaskManager(include_path=str(harness))
    assert {"minimind_demo_facts", "minimind_demo_addition", "minimind_demo"} <= set(manager.all_tasks)
    facts = [json.loads(line) for line in (harness / "facts.jsonl").read_text(encoding="utf-8").splitlines()]
    world = build_world(0)
    assert len(facts) == len(world.entities) * len(HELD_OUT_QUESTIONS)
    held_out = {t.format(n=e.name) for e in world.entities for ts in HELD_OUT_QUESTIONS.values() for t in ts}
    assert all(f["question"] in held_out and len(set(f["choices"])) == 4 for f in facts)
    right = [f["choices"][f["answer"]] for f in facts]
    assert right == [e.state(a) for e in world.entities for a in HELD_OUT_QUESTIONS]
    additions = [json.loads(line) for line in (harness / "addition.jsonl").read_text(encoding="utf-8").splitlines()]
    reason_eval = [json.loads(line) for line in demo_data(0)["reason_eval"].read_text(encoding="utf-8").splitlines()]
    asked = {r["conversations"][0]["content"] for r in reason_eval}
    assert len(additions) == 200 and sum(a["question"] in asked for a in additions) > 50  # the same pairs, phrasings drawn anew


def test_the_gate_promotes_only_past_every_threshold_and_never_below_the_holder():
    from minimind.driver.gate import judge, parse_gate

    gate = parse_gate("local_mc>=0.5, local_gen/exact_match >= 0.25")
    assert gate == {"local_mc": 0.5, "local_gen/exact_match": 0.25}
    champion = {"harness/local_mc/acc": 0.75, "harness/local_gen/exact_match": 0.5}
    better = {"harness/local_mc/acc": 1.0, "harness/local_gen/exact_match": 0.5}
    assert judge(gate, better, None).promoted and judge(gate, better, champion).promoted
    assert not judge(gate, champion, champion).promoted  # a tie does not move the alias
    worse = {"harness/local_mc/acc": 1.0, "harness/local_gen/exact_match": 0.25}
    refused = judge(gate, worse, champion)
    assert not refused.promoted and "worse than the current holder: local_gen/exact_match" in refused.reason
    below = judge(gate, {"harness/local_mc/acc": 0.25, "harness/local_gen/exact_match": 1.0}, None)
    assert not below.promoted and below.reason.startswith("below the gate: local_mc 0.2500 < 0.5")
    with pytest.raises(ValueError, match="several metrics; name one: facts/acc, facts/acc_norm"):
        judge({"facts": 0.5}, {"harness/facts/acc": 1.0, "harness/facts/acc_norm": 1.0}, None)
    with pytest.raises(ValueError, match="cannot read 'local_mc>0.5'"):
        parse_gate("local_mc>0.5")


def test_promote_moves_the_alias_only_for_a_version_that_passes_and_records_why_on_both(answering, tasks, mlflow_store,
                                                                                       tmp_path, capsys):
    """Version 1 knows the answers, version 2 guesses, version 3 knows them as well as version 1 does."""
    import mlflow

    from minimind import cli, tracking
    from minimind.model.checkpoint import save_model

    tracking.configure()
    guessing = random_model(vocab_size=len(answering.tokenizer))
    for index, model in enumerate((answering.model, guessing, answering.model)):
        with mlflow.start_run(run_name=f"gated-{index}") as run:
            folder = save_model(model, tmp_path / f"v{index}", answering.tokenizer)
            tracking.register_model_dir(folder, "gated", run_id=run.info.run_id)
    client = mlflow_client()

    def gated(version: int, gate: str) -> str:
        cli.main(["eval", f"models:/gated/{version}", "--tasks", "local_mc,local_gen", "--include-path", str(tasks),
                  "--promote", "champion", "--gate", gate])
        return capsys.readouterr().out.strip().splitlines()[-1]

    assert gated(1, "local_mc>=0.9") == "@champion: promoted (passes the gate; no current holder)"
    assert client.get_registered_model("gated").aliases == {"champion": 1}
    assert gated(2, "local_mc>=0.9").startswith("@champion: refused (below the gate: local_mc 0.")
    assert gated(2, "local_mc>=0").startswith("@champion: refused (worse than the current holder: local_mc 0.")
    assert gated(3, "local_mc>=0.9") == ("@champion: refused (passes the gate but does not beat the current holder on any "
                                         "gated figure)")
    assert client.get_registered_model("gated").aliases == {"champion": 1}
    second, holder = client.get_model_version("gated", "2"), client.get_model_version("gated", "1")
    assert second.tags["gate.champion"] == "refused" and second.tags["gate.champion.holder"] == "v1"
    assert json.loads(second.tags["gate.champion.scores"])["local_mc"]["holder"] == 1.0
    assert holder.tags["gate.champion"] == "promoted" and holder.tags["gate.champion.challenged_by.v3"].startswith("refused: ")
    assert tracking.model_source("models:/gated@champion")["source.version"] == "1"  # what the next stage starts from


def test_the_evaluation_job_spreads_tasks_over_ray_and_its_workers_read_only_staged_copies(answering, tasks, mlflow_store,
                                                                                         tmp_path):
    import shutil
    import sys
    from pathlib import Path

    import mlflow

    from minimind import storage, tracking
    from minimind.driver.harness import evaluate_on_worker
    from minimind.model.checkpoint import save_model

    # The worker's side alone: the driver's folders are gone once staged, and the tasks still find their data.
    driver_tasks = tmp_path / "driver-tasks"
    driver_model = save_model(answering.model, tmp_path / "driver-model", answering.tokenizer)
    shutil.copytree(tasks, driver_tasks)
    for yaml in driver_tasks.glob("*.yaml"):
        yaml.write_text(yaml.read_text(encoding="utf-8").replace(str(tasks), str(driver_tasks)), encoding="utf-8")
    staged = [(str(driver_tasks), storage.stage_input(driver_tasks, str(tmp_path / "storage" / "tasks")))]
    model_uri = storage.stage_input(driver_model, str(tmp_path / "storage" / "model"))
    shutil.rmtree(driver_tasks)
    shutil.rmtree(driver_model)
    settings = {"limit": None, "batch_size": 16, "chat_template": True, "device": None, "seed": 0}
    alone = evaluate_on_worker(model_uri, "answering", "local_mc", staged, settings)
    assert alone["results"]["local_mc"]["acc,none"] == 1.0

    # The job: one Ray task per named task, the results merged and logged on the version's run.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import evaluate as evaluate_job

    tracking.configure()
    with mlflow.start_run(run_name="job") as run:
        version = tracking.register_model_dir(save_model(answering.model, tmp_path / "m", answering.tokenizer), "job-eval",
                                              run_id=run.info.run_id)
    results = evaluate_job.main(["--model", f"models:/job-eval/{version.version}", "--tasks", "local_mc,local_gen",
                                 "--include-path", str(tasks), "--storage-path", str(tmp_path / "ray-storage")])
    assert set(results["results"]) == {"local_mc", "local_gen"}
    logged = mlflow_client().get_run(run.info.run_id).data.metrics
    assert logged["harness/local_mc/acc"] == 1.0 and logged["harness/local_gen/exact_match"] == 1.0
