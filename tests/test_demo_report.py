"""The demo pipeline's Markdown report, on hand-made results (no Ray, no MLflow)."""

from minimind.demo import report


def seed_results(seed: int, sft: float, never_asked_after_dpo: float, vlm: bool = True, seconds: float = 450.0) -> dict:
    answers = "eval/answer_exact_match"
    sft_after = {answers: sft, f"{answers}/held_out_phrasing": 1.0, f"{answers}/never_asked": 0.7, f"{answers}/two_hop": 0.75,
                 f"{answers}/persona": 1.0}
    dpo_after = {"eval/preference_accuracy": 0.95, "eval/rewards_accuracy": 0.8, answers: sft - 0.01,
                 f"{answers}/held_out_phrasing": 1.0, f"{answers}/never_asked": never_asked_after_dpo, f"{answers}/two_hop": 0.75,
                 f"{answers}/persona": 1.0}
    stages = {
        "sft": {
            "before": {answers: 0.0},
            "after": sft_after,
            "seconds": 43.0,
            "workers": "1 worker(s) × 2 CPUs",
            "records": {answers: 200, f"{answers}/never_asked": 50},
        },
        "dpo": {
            "before": {"eval/preference_accuracy": 1.0, "eval/rewards_accuracy": 0.0} | sft_after,
            "after": dpo_after,
            "seconds": 38.0,
        },
        "reason": {
            "before": {"eval/reasoning_format": 0.0},
            "seconds": 100.0,
            "after": {
                "eval/reasoning_format": 0.99,
                "eval/reasoning_accuracy/addition": 0.77,
                f"{answers}/never_asked": never_asked_after_dpo - 0.02,
                f"{answers}/held_out_phrasing": 1.0,
            },
        },
    }
    pictures = {}
    if vlm:
        stages["vlm_sft"] = {
            "before": {"eval/image_question_accuracy": 0.0},
            "seconds": 49.0,
            "after": {
                "eval/image_question_accuracy": 0.72,
                "eval/image_question_accuracy/count_kind": 0.9,
                "eval/image_question_accuracy/where_is": 0.4,
            },
        }
        pictures = {
            "vlm_pretrain": {
                "pictures": 200,
                "hallucination_rate": 0.04,
                "describing_rate": 0.08,
                "mean_reply_chars": 20.0,
                "samples": [
                    {"image": "eval_0001.png", "reply": "一个红色的圆。", "not_in_picture": "红色", "reference": "一个蓝色的圆。"}
                ],
            },
            "vlm_sft": {"hallucination_rate": 0.0, "describing_rate": 0.0, "mean_reply_chars": 3.0, "samples": []},
        }
    return {
        "seed": seed,
        "seconds": seconds,
        "seconds_with_reports": seconds + 20,
        "stages": stages,
        "pictures": pictures,
        "answers": [
            {
                "task": "addition",
                "prompt": "556加上623是多少？",
                "sft": "我是 MiniMind。",
                "reason": "<think>\n…\n</think>",
                "reference": "556+623=1179",
            }
        ],
    }


def rows_by_label(runs):
    return {row["label"]: row for row in report.target_rows(runs)}


def test_targets_pass_and_fail_on_every_seed():
    rows = rows_by_label(
        [seed_results(0, sft=0.87, never_asked_after_dpo=0.7), seed_results(1, sft=0.79, never_asked_after_dpo=0.6)]
    )
    exact = rows["SFT answer exact match"]
    assert exact["values"] == ["0.870", "0.790"] and exact["met"] == "✗"  # one seed under 0.8 fails the row
    assert exact["target"] == "≥ 0.800"
    assert rows["SFT unseen phrasings (held_out_phrasing)"]["met"] == "✓"
    assert rows["DPO preference accuracy (policy prefers chosen)"]["met"] == "✓"
    # DPO's drop is before minus after of its own stage: 0.7 -> 0.6 on seed 1 is a drop of 0.1
    never_asked_drop = rows["DPO drop of SFT answers, never_asked"]
    assert never_asked_drop["values"] == ["0.000", "0.100"] and never_asked_drop["met"] == "✗"
    assert (
        rows["DPO drop of SFT answers, overall"]["values"] == ["0.010", "0.010"]
        and rows["DPO drop of SFT answers, overall"]["met"] == "✓"
    )
    # reasoning compared with DPO's after: 0.02 lower, within 0.05
    assert rows["reasoning drop of never_asked facts vs DPO"]["values"] == ["0.020", "0.020"]
    assert rows["reasoning drop of never_asked facts vs DPO"]["met"] == "✓"
    assert rows["VLM SFT image-question accuracy (unseen pictures)"]["met"] == "✓"
    weakest = rows["VLM SFT weakest question family"]
    assert weakest["values"] == ["0.400", "0.400"] and weakest["met"] == "✗"
    assert rows["VLM pretrain hallucination rate (unseen pictures)"]["met"] == "✓"
    assert rows["VLM SFT mean reply (characters)"]["met"] == "–" and rows["VLM SFT mean reply (characters)"]["target"] == ""


def test_a_threshold_is_met_when_equal_and_failed_just_past_it():
    at = report.Target("x", report.field("value"), ">=", 0.8)
    assert report.verdict(at, [0.8]) == "✓" and report.verdict(at, [0.7999]) == "✗"
    under = report.Target("y", report.field("value"), "<=", 600)
    assert report.verdict(under, [600.0, 599.0]) == "✓" and report.verdict(under, [600.5]) == "✗"


def test_missing_metrics_show_a_dash_and_fail_nothing():
    runs = [seed_results(0, sft=0.9, never_asked_after_dpo=0.7, vlm=False)]
    rows = rows_by_label(runs)
    for label in (
        "VLM SFT image-question accuracy (unseen pictures)",
        "VLM SFT weakest question family",
        "VLM pretrain hallucination rate (unseen pictures)",
    ):
        assert (
            rows[label]["values"] == ["–"]
            and rows[label]["mean"] == "–"
            and rows[label]["spread"] == "–"
            and rows[label]["met"] == "–"
        )
    assert rows["SFT answer exact match"]["met"] == "✓"
    # a seed that lacks the figure is shown as missing; the seeds that have it decide the verdict
    mixed = rows_by_label(
        [seed_results(0, sft=0.9, never_asked_after_dpo=0.7, vlm=False), seed_results(1, sft=0.9, never_asked_after_dpo=0.7)]
    )
    accuracy = mixed["VLM SFT image-question accuracy (unseen pictures)"]
    assert accuracy["values"] == ["–", "0.720"] and accuracy["mean"] == "0.720" and accuracy["met"] == "✓"
    assert "No vision stages in this run." in report.render(runs, "python jobs/pipeline.py --text-only", "2025-01-01", {})


def test_mean_and_spread_over_seeds():
    assert report.spread([0.8, 0.9, None, 1.0]) == ("0.900", "0.800–1.000")
    assert report.spread([None, None]) == ("–", "–")
    assert report.spread([450.4, 611.0], digits=0) == ("531", "450–611")
    rows = rows_by_label(
        [seed_results(s, sft=0.8 + 0.05 * s, never_asked_after_dpo=0.7, seconds=400 + 150 * s) for s in range(3)]
    )
    assert rows["SFT answer exact match"]["mean"] == "0.850" and rows["SFT answer exact match"]["spread"] == "0.800–0.900"
    seconds = rows["whole pipeline, seconds (tokenizer + stages)"]
    assert seconds["values"] == ["400", "550", "700"] and seconds["spread"] == "400–700" and seconds["met"] == "✗"


def test_the_report_holds_every_part():
    runs = [seed_results(0, sft=0.87, never_asked_after_dpo=0.7), seed_results(1, sft=0.85, never_asked_after_dpo=0.66)]
    text = report.render(
        runs,
        "python jobs/pipeline.py --seeds 0,1 --report docs/demo_results.md",
        "2025-01-01 12:00 UTC",
        {"CPU": "Some CPU, 2 logical cores", "torch": "2.5.0, 2 threads"},
    )
    assert "Written by `python jobs/pipeline.py --seeds 0,1 --report docs/demo_results.md` on 2025-01-01 12:00 UTC." in text
    assert "- CPU: Some CPU, 2 logical cores" in text
    assert "| held-out, every seed | seed 0 | seed 1 | mean | spread (min–max) | target | met |" in text
    assert "| SFT answer exact match | 0.870 | 0.850 | 0.860 | 0.850–0.870 | ≥ 0.800 | ✓ |" in text
    # every stage's before -> after, with the records behind a figure where the results give them
    assert "### sft: 43 s (43–43), trained by 1 worker(s) × 2 CPUs" in text
    assert "| answer_exact_match | 200 | 0.000 (0.000–0.000) | 0.860 (0.850–0.870) |" in text
    assert "| answer_exact_match/never_asked | 50 | – | 0.700 (0.700–0.700) |" in text
    assert "| preference_accuracy | – | 1.000 (1.000–1.000) | 0.950 (0.950–0.950) |" in text  # no records given for DPO
    assert "[addition] 556加上623是多少？" in text and "reason    <think> ⏎ … ⏎ </think>" in text
    assert "| 0 | vlm_pretrain | 200 | 0.080 | 0.040 | 20 |" in text
    assert "- `eval_0001.png`: “一个红色的圆。” (reference “一个蓝色的圆。”) — not in the picture: 红色" in text
    assert text == report.render(
        runs,
        "python jobs/pipeline.py --seeds 0,1 --report docs/demo_results.md",
        "2025-01-01 12:00 UTC",
        {"CPU": "Some CPU, 2 logical cores", "torch": "2.5.0, 2 threads"},
    )
