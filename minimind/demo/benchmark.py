"""The demo world as lm-evaluation-harness tasks (its own YAML + JSONL format), for `minimind eval` offline:

- `minimind_demo_facts` (multiple choice, by log-likelihood): a fact of every person of the world, asked in a
  held-out phrasing; the choices are the canonical answer sentence with the right value and three others.
- `minimind_demo_addition` (generation): the reasoning stage's held-out three-digit additions; the last number
  the model writes before `</answer>` must be the sum.

Both carry the tag `minimind_demo` (`--tasks minimind_demo` runs both). The YAML names its JSONL by absolute
path, as the harness reads `data_files` from the working directory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from minimind.demo.world import ADDITION_QUESTIONS, ATTRIBUTES, HELD_OUT_QUESTIONS, STATEMENTS, World, addition_problems

# Both tasks read a JSONL file through the harness's `json` dataset; {data} is its path, quoted.
HEADER = """task: {task}
tag: minimind_demo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
FOOTER = """metadata:
  version: 1.0
"""

FACTS = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

ADDITION = """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["</answer>"]
  max_gen_toks: 256
  do_sample: false
filter_list:
  - name: last_number
    filter:
      - function: regex
        regex_pattern: "[0-9]+"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def fact_choices(world: World) -> list[dict]:
    """One multiple-choice question per person and attribute, in a held-out phrasing, with four answers."""
    rng = random.Random(f"{world.seed}/benchmark")
    docs = []
    for entity in world.entities:
        for attribute in ATTRIBUTES:
            values = sorted({other.value(attribute) for other in world.entities} - {entity.value(attribute)})
            canonical = STATEMENTS[attribute][0]
            choices = [entity.state(attribute)] + [canonical.format(n=entity.name, v=v) for v in rng.sample(values, 3)]
            rng.shuffle(choices)
            docs.append({"question": rng.choice(HELD_OUT_QUESTIONS[attribute]).format(n=entity.name), "choices": choices,
                         "answer": choices.index(entity.state(attribute))})
    return docs


def held_out_additions(world: World) -> list[dict]:
    """The reasoning stage's held-out number pairs, asked as it asks them."""
    rng = random.Random(f"{world.seed}/benchmark-addition")
    _, pairs = addition_problems(world.seed)
    return [{"question": rng.choice(ADDITION_QUESTIONS).format(a=a, b=b), "answer": str(a + b)} for a, b in pairs]


def write_benchmark(world: World, folder: Path, final_folder: Path) -> None:
    """The two tasks' YAML and JSONL into `folder`, their YAML naming the JSONL where `folder` will be published
    (`final_folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body, docs in (("facts", FACTS, fact_choices(world)), ("addition", ADDITION, held_out_additions(world))):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        header = HEADER.format(task=f"minimind_demo_{name}", data=json.dumps(str(final_folder / f"{name}.jsonl")))
        (folder / f"minimind_demo_{name}.yaml").write_text(header + body + FOOTER, encoding="utf-8")
