"""The demo pipeline's results as a Markdown report: the issue's targets checked on every seed, each
stage's held-out metrics before and after, the side-by-side answers and the pictures' report.

Pure functions of plain dicts (no Ray, no MLflow), one dict per seed as jobs/pipeline.py builds it:

    {"seed": 0, "seconds": 431.0, "seconds_with_reports": 458.0,
     "stages": {"sft": {"before": {"eval/answer_exact_match": 0.0, ...}, "after": {...}, "seconds": 43.0,
                        "records": {"eval/answer_exact_match": 200, ...}}, ...},
     "answers": [{"task", "prompt", "pretrain", "sft", ..., "reference"}, ...],   # showcase.stage_answers
     "pictures": {"vlm_pretrain": {"hallucination_rate", "describing_rate", "mean_reply_chars", "samples"}, ...}}

A value a run does not have (VLM stages skipped with --text-only, a family the held-out file lacks) shows
as "–" and fails no target.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MISSING = "–"
Value = Callable[[dict], "float | None"]


@dataclass(frozen=True)
class Target:
    label: str
    value: Value  # one seed's results -> the figure, None where the run lacks it
    comparison: str | None = None  # ">=" or "<="; None: reported beside the targets, not judged
    threshold: float | None = None
    digits: int = 3


COMPARISONS = {">=": operator.ge, "<=": operator.le}
SYMBOLS = {">=": "≥", "<=": "≤"}


def after(stage: str, key: str) -> Value:
    return lambda run: run.get("stages", {}).get(stage, {}).get("after", {}).get(key)


def drop_in_stage(stage: str, key: str) -> Value:
    """How much the stage lowered a metric: before minus after."""

    def value(run: dict) -> float | None:
        found = run.get("stages", {}).get(stage, {})
        before, later = found.get("before", {}).get(key), found.get("after", {}).get(key)
        return None if before is None or later is None else before - later

    return value


def drop_since(earlier_stage: str, stage: str, key: str) -> Value:
    """How much lower a metric is after `stage` than after `earlier_stage`."""

    def value(run: dict) -> float | None:
        was, now = after(earlier_stage, key)(run), after(stage, key)(run)
        return None if was is None or now is None else was - now

    return value


def weakest_family(stage: str, key: str) -> Value:
    """The lowest of a metric's per-family values (`key/family`) after the stage."""

    def value(run: dict) -> float | None:
        found = [v for k, v in run.get("stages", {}).get(stage, {}).get("after", {}).items() if k.startswith(key + "/")]
        return min(found) if found else None

    return value


def picture(stage: str, key: str) -> Value:
    return lambda run: run.get("pictures", {}).get(stage, {}).get(key)


def field(key: str) -> Value:
    return lambda run: run.get(key)


ANSWERS = "eval/answer_exact_match"
TARGETS = [  # issue 29: held-out figures, every seed
    Target("SFT answer exact match", after("sft", ANSWERS), ">=", 0.8),
    Target("SFT unseen phrasings (held_out_phrasing)", after("sft", f"{ANSWERS}/held_out_phrasing"), ">=", 0.95),
    Target("SFT people never asked about (never_asked)", after("sft", f"{ANSWERS}/never_asked"), ">=", 0.6),
    Target("SFT unseen two-hop pairs (two_hop)", after("sft", f"{ANSWERS}/two_hop"), ">=", 0.7),
    Target("DPO preference accuracy (policy prefers chosen)", after("dpo", "eval/preference_accuracy"), ">=", 0.9),
    Target("DPO drop of SFT answers, overall", drop_in_stage("dpo", ANSWERS), "<=", 0.02),
    *(
        Target(f"DPO drop of SFT answers, {family}", drop_in_stage("dpo", f"{ANSWERS}/{family}"), "<=", 0.02)
        for family in ("held_out_phrasing", "never_asked", "two_hop", "persona")
    ),
    Target("reasoning `<think>/<answer>` format", after("reason", "eval/reasoning_format"), ">=", 0.95),
    Target("reasoning accuracy on unseen additions", after("reason", "eval/reasoning_accuracy/addition"), ">=", 0.6),
    Target("reasoning drop of never_asked facts vs DPO", drop_since("dpo", "reason", f"{ANSWERS}/never_asked"), "<=", 0.05),
    Target(
        "reasoning drop of held_out_phrasing facts vs DPO",
        drop_since("dpo", "reason", f"{ANSWERS}/held_out_phrasing"),
        "<=",
        0.05,
    ),
    # issue 32: tool use, from the reasoning model
    Target("tools: the right call when a tool is needed (unseen numbers, days)", after("tools", "eval/tool_call_accuracy"),
           ">=", 0.9),
    Target("tools: no call when none is needed", after("tools", "eval/no_call_accuracy"), ">=", 0.9),
    Target("tools: the answer from the tool's result", after("tools", "eval/tool_answer_accuracy")),
    Target("tools drop of SFT answers", drop_since("sft", "tools", ANSWERS)),
    Target("VLM SFT image-question accuracy (unseen pictures)", after("vlm_sft", "eval/image_question_accuracy"), ">=", 0.7),
    Target("VLM SFT weakest question family", weakest_family("vlm_sft", "eval/image_question_accuracy"), ">=", 0.5),
    Target("VLM pretrain hallucination rate (unseen pictures)", picture("vlm_pretrain", "hallucination_rate"), "<=", 0.10),
    Target("VLM pretrain mean reply (characters)", picture("vlm_pretrain", "mean_reply_chars"), digits=0),
    Target("VLM SFT hallucination rate", picture("vlm_sft", "hallucination_rate")),
    Target("VLM SFT mean reply (characters)", picture("vlm_sft", "mean_reply_chars"), digits=0),
    Target("whole pipeline, seconds (tokenizer + stages)", field("seconds"), "<=", 600, digits=0),
    Target("whole pipeline with the reports, seconds", field("seconds_with_reports"), digits=0),
]


def number(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def spread(values: Sequence[float | None], digits: int = 3) -> tuple[str, str]:
    """Mean and min–max of the values present, as text ("–" for both when none is)."""
    present = [v for v in values if v is not None]
    if not present:
        return MISSING, MISSING
    return number(sum(present) / len(present), digits), f"{number(min(present), digits)}–{number(max(present), digits)}"


def verdict(target: Target, values: Sequence[float | None]) -> str:
    """✓ when every seed that has the figure meets the target, ✗ when one does not, "–" when no seed has
    it or the row is not a target."""
    present = [v for v in values if v is not None]
    if target.comparison is None or not present:
        return MISSING
    return "✓" if all(COMPARISONS[target.comparison](v, target.threshold) for v in present) else "✗"


def target_rows(runs: Sequence[dict], targets: Sequence[Target] = TARGETS) -> list[dict]:
    """One row per target: its label, each seed's value, mean, spread, the target and whether it is met."""
    rows = []
    for target in targets:
        values = [target.value(run) for run in runs]
        mean, low_high = spread(values, target.digits)
        rows.append(
            {
                "label": target.label,
                "values": [number(v, target.digits) for v in values],
                "mean": mean,
                "spread": low_high,
                "target": f"{SYMBOLS[target.comparison]} {number(target.threshold, target.digits)}" if target.comparison else "",
                "met": verdict(target, values),
            }
        )
    return rows


def targets_table(runs: Sequence[dict], targets: Sequence[Target] = TARGETS) -> str:
    header = ["held-out, every seed", *(f"seed {run['seed']}" for run in runs), "mean", "spread (min–max)", "target", "met"]
    lines = [_row(header), _row(["---"] * len(header))]
    for row in target_rows(runs, targets):
        lines.append(_row([row["label"], *row["values"], row["mean"], row["spread"], row["target"], row["met"]]))
    return "\n".join(lines)


def stage_tables(runs: Sequence[dict]) -> str:
    """Per stage, every held-out metric before → after as mean (min–max) over the seeds, with the number
    of held-out records behind it where the results give it."""
    stages = list(dict.fromkeys(stage for run in runs for stage in run.get("stages", {})))
    sections = []
    for stage in stages:
        found = [run["stages"][stage] for run in runs if stage in run.get("stages", {})]
        seconds, seconds_spread = spread([f.get("seconds") for f in found], 0)
        keys = list(dict.fromkeys(key for f in found for key in f.get("after", {})))
        workers = sorted({f["workers"] for f in found if "workers" in f})
        timing = f"{seconds} s ({seconds_spread})" if len(found) > 1 else f"{seconds} s"
        lines = [
            f"### {stage}: {timing}" + (f", trained by {' / '.join(workers)}" if workers else ""),
            "",
            _row(["held-out metric", "records", "before", "after"]),
            _row(["---"] * 4),
        ]
        for key in keys:
            counts = sorted({f["records"][key] for f in found if key in f.get("records", {})})
            records = MISSING if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
            lines.append(
                _row(
                    [
                        key.removeprefix("eval/"),
                        records,
                        _mean_spread([f.get("before", {}).get(key) for f in found]),
                        _mean_spread([f.get("after", {}).get(key) for f in found]),
                    ]
                )
            )
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def harness_table(runs: Sequence[dict]) -> str:
    """Per text stage, each lm-evaluation-harness score as mean (min–max) over the seeds."""
    stages = list(dict.fromkeys(stage for run in runs for stage in run.get("harness", {})))
    keys = list(dict.fromkeys(key for run in runs for figures in run.get("harness", {}).values() for key in figures))
    if not keys:
        return "No harness tasks in this run."
    lines = [_row(["stage", *(key.removeprefix("harness/") for key in keys)]), _row(["---"] * (len(keys) + 1))]
    for stage in stages:
        lines.append(_row([stage, *(_mean_spread([run.get("harness", {}).get(stage, {}).get(key) for run in runs])
                                    for key in keys)]))
    return "\n".join(lines)


def answers_block(rows: Sequence[dict]) -> str:
    """The side-by-side answers (one seed's) as preformatted text, newlines shown as ⏎."""
    stages = [key for key in (rows[0] if rows else {}) if key not in ("task", "prompt", "reference")]
    lines = []
    for row in rows:
        lines.append(f"[{row['task']}] {row['prompt']}")
        lines += [f"  {stage:9s} {_flat(row[stage])}" for stage in [*stages, "reference"]]
    return "```\n" + "\n".join(lines) + "\n```"


def pictures_section(runs: Sequence[dict], samples: int = 3) -> str:
    lines = [
        _row(
            ["seed", "stage", "held-out pictures", "names a shape/colour/count", "hallucination rate", "mean reply (characters)"]
        ),
        _row(["---"] * 6),
    ]
    for run in runs:
        for stage, found in run.get("pictures", {}).items():
            lines.append(
                _row(
                    [
                        str(run["seed"]),
                        stage,
                        str(found.get("pictures", "–")),
                        number(found.get("describing_rate")),
                        number(found.get("hallucination_rate")),
                        number(found.get("mean_reply_chars"), 0),
                    ]
                )
            )
    if len(lines) == 2:
        return "No vision stages in this run."
    lines.append("")
    for run in runs:
        for stage, found in run.get("pictures", {}).items():
            if not found.get("samples"):
                continue
            lines.append(f"Seed {run['seed']}, {stage}:")
            for sample in found["samples"][:samples]:
                wrong = f" — not in the picture: {sample['not_in_picture']}" if sample.get("not_in_picture") else ""
                lines.append(
                    f"- `{sample['image']}`: “{_flat(sample['reply'])}” (reference “{_flat(sample.get('reference', ''))}”){wrong}"
                )
            lines.append("")
    return "\n".join(lines).rstrip()


def render(runs: Sequence[dict], command: str, date: str, machine: dict[str, str]) -> str:
    """The whole report; `machine` maps a label (CPU, torch, ...) to its value."""
    first = runs[0] if runs else {}
    return "\n".join(
        [
            "# Demo pipeline results",
            "",
            f"Written by `{command}` on {date}.",
            "",
            *(f"- {label}: {value}" for label, value in machine.items()),
            "",
            "## Targets",
            "",
            "Each row is a held-out figure of every seed; a target is met (✓) when every seed that has the figure meets it. "
            '"Drop" is the earlier value minus the later one; "–": the run does not have the figure.',
            "",
            targets_table(runs),
            "",
            "## Every stage, before → after",
            "",
            "Mean over the seeds (min–max). Records: how many held-out records the figure is measured on.",
            "",
            stage_tables(runs),
            "",
            "## lm-evaluation-harness on each text stage's model",
            "",
            "The demo's harness tasks (`minimind eval MODEL --tasks minimind_demo`): multiple-choice facts, scored by "
            "log-likelihood, and generated sums. Mean over the seeds (min–max).",
            "",
            harness_table(runs),
            "",
            f"## The same held-out prompts after each text stage (seed {first.get('seed', MISSING)})",
            "",
            answers_block(first.get("answers", [])) if first.get("answers") else "No text stages in this run.",
            "",
            "## The vision models describing unseen pictures",
            "",
            pictures_section(runs),
            "",
        ]
    )


def _mean_spread(values: Sequence[float | None]) -> str:
    mean, low_high = spread(values)
    return mean if mean == MISSING or len([v for v in values if v is not None]) == 1 else f"{mean} ({low_high})"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _flat(text: str) -> str:
    return text.replace("\n", " ⏎ ")
