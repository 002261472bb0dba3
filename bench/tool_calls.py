"""Where a tool-calling model's held-out calls go wrong, tool by tool: right, the wrong tool, which arguments are
wrong, a call that does not parse, or no call at all. The replies are the tools stage's own
(`replies_with_tools`, as tool_use_scores: greedy, the record's tools listed); a few misses of each kind are printed.

    python bench/tool_calls.py --model models:/minimind-tools/1             # the demo's held-out file, seed 0
    python bench/tool_calls.py --model models:/minimind-tools/2 --seed 1
    python bench/tool_calls.py --model DIR --eval tool_calls_eval.jsonl     # records naming "task": call
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def miss(made: list[dict], wanted: list[dict]) -> str:
    """"right", or what differs: the tool, the number of calls, or the arguments that are wrong (by name)."""
    if made == wanted:
        return "right"
    if [c["name"] for c in made] != [c["name"] for c in wanted]:
        return "wrong tool"
    wrong = sorted({key for m, w in zip(made, wanted) for key in set(m["arguments"]) | set(w["arguments"])
                    if m["arguments"].get(key) != w["arguments"].get(key)})
    return "wrong " + ",".join(wrong)


def main(argv=None) -> Counter:
    from minimind.data.rows import iter_jsonl
    from minimind.data.tools import CALL_START, CallNotParsed, parse_calls
    from minimind.demo import demo_data
    from minimind.driver.evaluate import record_tasks, replies_with_tools
    from minimind.model.checkpoint import load_model
    from minimind.model.tokenizer import load_tokenizer
    from minimind.tracking import resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or models:/ URI")
    parser.add_argument("--eval", help="held-out JSONL (default: the demo's tools_eval of --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=3, help="misses printed per tool and kind")
    args = parser.parse_args(argv)

    folder = resolve_model(args.model)
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    path = args.eval or demo_data(args.seed)["tools_eval"]
    records = [record for (_, record), task in zip(iter_jsonl(path, "sft"), record_tasks(path)) if task == "call"]
    questions, wanted = [], []
    for record in records:
        at = next(i for i, message in enumerate(record["conversations"]) if message.get("tool_calls"))
        questions.append((record["conversations"][:at], record.get("tools")))
        wanted.append([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                       for c in record["conversations"][at]["tool_calls"]])
    replies = replies_with_tools(model, tokenizer, questions)

    counts: Counter = Counter()
    for (conversation, _), calls, reply in zip(questions, wanted, replies):
        tool = calls[0]["name"]
        if CALL_START not in reply:
            kind = "no call"
        else:
            try:
                kind = miss(parse_calls(reply)[1], calls)
            except CallNotParsed:
                kind = "does not parse"
        counts[(tool, kind)] += 1
        if kind != "right" and counts[(tool, kind)] <= args.show:
            print(f"{tool}, {kind}: {conversation[-1]['content']} -> {reply!r}")
    for (tool, kind), count in sorted(counts.items()):
        print(f"{tool:10s} {kind:15s} {count}")
    return counts


if __name__ == "__main__":
    main()
