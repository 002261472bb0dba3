"""An evaluation gate in the model registry: `minimind eval models:/NAME/V --tasks ... --promote champion --gate
"task>=value,..."` moves the alias to version V only when its harness scores pass every threshold and are no
worse than the alias's current holder on each gated figure, and better on at least one. Both versions get the
comparison as tags (`gate.<alias>.*`), so the registry says why an alias moved or did not.

A gated figure is `task/metric` as logged (`harness/<task>/<metric>`), or `task` alone where the task has one
metric. The current holder's scores are read from its run when it was evaluated on those tasks, else measured
now with the same settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THRESHOLD = re.compile(r"^\s*([^<>=\s]+)\s*>=\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    reason: str
    compared: dict[str, tuple[float, float | None]]  # figure -> (candidate, champion or None)


def parse_gate(text: str) -> dict[str, float]:
    """`"facts/acc>=0.9, addition>=0.5"` -> {"facts/acc": 0.9, "addition": 0.5}."""
    gate = {}
    for part in filter(str.strip, text.split(",")):
        found = THRESHOLD.match(part)
        if not found:
            raise ValueError(f"--gate: cannot read {part.strip()!r}; expected task>=value or task/metric>=value")
        gate[found.group(1)] = float(found.group(2))
    if not gate:
        raise ValueError("--gate names no threshold")
    return gate


def figure(scores: dict[str, float], name: str) -> float:
    """The score a gate names: `task/metric`, or `task` when the task has one metric."""
    if f"harness/{name}" in scores:
        return scores[f"harness/{name}"]
    metrics = sorted(key for key in scores if key.startswith(f"harness/{name}/"))
    if len(metrics) == 1:
        return scores[metrics[0]]
    if not metrics:
        raise ValueError(f"--gate names {name!r}, which this evaluation did not score (add it to --tasks)")
    raise ValueError(f"--gate: {name!r} has several metrics; name one: {', '.join(m[len('harness/'):] for m in metrics)}")


def judge(gate: dict[str, float], candidate: dict[str, float], champion: dict[str, float] | None) -> Verdict:
    """Promote when every gated figure passes its threshold and, against a champion, none is worse and one is better."""
    compared = {name: (figure(candidate, name), figure(champion, name) if champion else None) for name in gate}
    below = [f"{name} {value:.4f} < {gate[name]}" for name, (value, _) in compared.items() if value < gate[name]]
    if below:
        return Verdict(False, "below the gate: " + "; ".join(below), compared)
    if champion is None:
        return Verdict(True, "passes the gate; no current holder", compared)
    worse = [f"{name} {mine:.4f} < {theirs:.4f}" for name, (mine, theirs) in compared.items() if mine < theirs]
    if worse:
        return Verdict(False, "worse than the current holder: " + "; ".join(worse), compared)
    if not any(mine > theirs for mine, theirs in compared.values()):
        return Verdict(False, "passes the gate but does not beat the current holder on any gated figure", compared)
    return Verdict(True, "passes the gate and beats the current holder", compared)
