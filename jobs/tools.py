"""Tool calling: SFT on conversations in OpenAI's message shape that call tools (the call and the answer from
its result supervised, the result not) and that need none, from models:/minimind-reason/latest by default.

    python jobs/tools.py                       # the demo's tools (add, weather: minimind/demo/tools.json)
    python jobs/tools.py --data tool_calls.jsonl --eval-data tool_calls_eval.jsonl --seq-len 2048

Held-out: the right call when a tool is needed, no call when none is, the answer from a tool's result (records
naming their "task": call or no_call), and the SFT answers it must keep. Registers `minimind-tools`.
"""

from minimind.driver.runner import main

if __name__ == "__main__":
    main("tools", description=__doc__)
