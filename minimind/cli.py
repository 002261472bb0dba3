"""The `minimind` command: try a model directory, export it, or run the demo.

    minimind generate --model DIR --prompt "从前有座山"
    minimind chat --model DIR                       # interactive, with the tokenizer's chat template
    minimind chat --model VLM_DIR --image cat.png --prompt "图中有什么？"   # MiniMind-V
    minimind export MODEL out.gguf --quant q8_0     # one GGUF file for llama.cpp / Ollama (MODEL: folder or models:/ URI)
    minimind export MODEL OUT_DIR                   # Hugging Face Llama (or Qwen3, for minimind-3) directory (also export-hf)
    minimind merge-lora ADAPTER OUT_DIR             # LoRA adapters (folder or models:/ URI) merged into their base
    minimind import full_sft_512.pth OUT_DIR --tokenizer MINIMIND_TOKENIZER_DIR [--register-as NAME]
    minimind eval MODEL --tasks minimind_demo       # lm-evaluation-harness tasks (any task it knows; --include-path DIR)
    minimind demo                                   # a tour of the model on synthetic data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from minimind.data.images import load_image
from minimind.data.rows import IMAGE_MARKER
from minimind.data.tools import CallNotParsed, check_calls, check_tools, parse_calls
from minimind.demo import model_tour
from minimind.driver.eval_flags import add_eval_flags
from minimind.inference.chat import Chat
from minimind.inference.generate import compile_for_decoding, stream_generate, wants_compile
from minimind.model.config import PRESETS
from minimind.model.gguf_export import QUANTS, export_gguf
from minimind.model.hf import export_hf, import_model
from minimind.model.lora import ADAPTER_CONFIG_NAME, LoRAConfig, is_adapter_dir, merge_adapter_dir
from minimind.model.vision import is_vlm_dir
from minimind.training.flags import parse_overrides


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model directory written by save_model (with tokenizer files)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="weights in bf16 (half the bytes read per token; fp32 where the GPU has no bf16) or fp32")
    parser.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto",
        help="torch.compile the decoding step (auto: on a CPU, where one-row steps compile with inductor, about 30 s "
        "the first time on 2 cores, then read from inductor's cache; on a GPU: CUDA graphs over a static KV cache)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimind", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="continue a prompt (raw text, or a chat turn with --chat)")
    _sampling_flags(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")

    chat = commands.add_parser("chat", help="chat with a model (one turn with --prompt, else interactive)")
    _sampling_flags(chat)
    chat.add_argument("--prompt", default=None)
    chat.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    chat.add_argument("--image", action="append", default=[], help="an image for a MiniMind-V model (repeatable); "
                      "placed where the first turn says <image>, else before it")
    chat.add_argument("--tools", default=None, help="a JSON file of tools (OpenAI's function shape) the model may call; "
                      "each call is shown and its result asked for (one turn with --prompt: the call is the end)")

    export = commands.add_parser(
        "export", help="a GGUF file (llama.cpp, Ollama) or a Hugging Face Llama/Qwen3 folder (transformers, vLLM)"
    )
    export.add_argument("source", help="model folder, or its models:/ or runs:/ URI (LoRA adapters are merged first)")
    export.add_argument("destination", help="output .gguf file or folder")
    export.add_argument("--format", choices=["gguf", "hf"], default=None,
                        help="default: gguf when DESTINATION ends in .gguf, else hf")
    export.add_argument("--quant", choices=QUANTS, default="f16",
                        help="GGUF weights: f16, q8_0 (8-bit blocks, about half of f16's bytes) or f32")
    export_hf_command = commands.add_parser(
        "export-hf", help="write a Hugging Face LlamaForCausalLM directory (Qwen3ForCausalLM for a minimind-3 model)"
    )
    export_hf_command.add_argument("source", help="model folder, or its models:/ or runs:/ URI")
    export_hf_command.add_argument("destination", help="output directory")

    merge = commands.add_parser("merge-lora", help="fold LoRA adapters into their base model: a plain model folder")
    merge.add_argument("adapter", help="a LoRA adapter folder (a --lora-rank job's result) or its models:/ or runs:/ URI")
    merge.add_argument("destination", help="output model folder")
    merge.add_argument("--base", default=None, help="base model folder or URI (default: the one the adapters name)")

    imported = commands.add_parser(
        "import", help="a MiniMind .pth, MiniMind transformers folder or Llama folder as a model folder"
    )
    imported.add_argument("source", help="MiniMind .pth state dict (either naming era), or a MiniMind/Llama transformers folder")
    imported.add_argument("destination", help="output model folder")
    imported.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the source folder's own)")
    imported.add_argument(
        "--preset", default=None, help="take the fields the weights cannot show (heads, rope theta, context) from this preset"
    )
    imported.add_argument("--config-overrides", default=None, help="fields to set, e.g. num_attention_heads=8,rope_theta=10000")
    imported.add_argument(
        "--markers",
        default=None,
        help="the tokenizer's strings for the tags and the image placeholder, e.g. "
        "image=<|image_pad|>,think_start=<think> (default: its config's, else <think> </think> <answer> </answer> <image>)",
    )
    imported.add_argument("--register-as", default=None, help="also register the folder as the next version of this MLflow model")

    evaluate = commands.add_parser(
        "eval", help="lm-evaluation-harness tasks on a model folder or models:/ URI, the scores logged on its MLflow run"
    )
    add_eval_flags(evaluate)

    demo = commands.add_parser("demo", help="build, train briefly, save, reload, generate and export a tiny model")
    demo.add_argument("--preset", default="tiny")
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--output", default="checkpoints/demo-model")
    return parser


class _Session:
    """A loaded model + tokenizer that prints streamed replies."""

    def __init__(self, args):
        from contextlib import ExitStack

        with ExitStack() as loading:
            model_dir = args.model
            if is_adapter_dir(args.model):  # LoRA adapters: merged into the base they name, in a folder removed once loaded
                from minimind import tracking  # MLflow, imported only when a command needs it (seconds)

                model_dir = loading.enter_context(tracking.resolved_model(args.model))
            if getattr(args, "image", None) and not is_vlm_dir(model_dir):
                raise SystemExit(f"--image needs a MiniMind-V model directory; {args.model} is a text-only model")
            self.chat = Chat.load(model_dir, device=args.device, dtype=args.dtype)
        self.model, self.tokenizer = self.chat.model, self.chat.tokenizer
        images = [load_image(path) for path in getattr(args, "image", None) or []]
        self.prompt_inputs = {"pixel_values": self.chat.pixel_values(images)} if images else None
        self.image_count = len(images)
        if wants_compile(args.compile, next(self.model.parameters()).device):
            compile_for_decoding(self.model)
        self.params = self.chat.sampling(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )

    def reply(self, prompt_ids: list[int]) -> str:
        out = sys.stdout
        tokens, printed = [], ""
        for token in stream_generate(self.model, prompt_ids, self.params, self.prompt_inputs):
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                out.write(text[len(printed) :])
                out.flush()
                printed = text
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        out.write(text[len(printed) :] + "\n")
        return text

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise SystemExit("this model's tokenizer has no chat template; use `minimind generate` for raw text")
        if self.chat.takes_images:
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            missing = self.image_count - sum(m["content"].count(IMAGE_MARKER) for m in messages)
            if missing > 0:  # images not placed by the user go before the first question
                messages = [*messages]
                messages[first_user] = {
                    **messages[first_user],
                    "content": IMAGE_MARKER * missing + "\n" + messages[first_user]["content"],
                }
        return self.chat.prompt_ids(messages, tools)


def run_generate(args) -> None:
    session = _Session(args)
    if args.chat:
        prompt_ids = session.chat_ids([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = session.tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise SystemExit("the prompt is empty")
    session.reply(prompt_ids)


def run_chat(args) -> None:
    session = _Session(args)
    tools = _read_tools(args.tools) if args.tools else None
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.prompt is None
    turns = _read_turns() if interactive else [args.prompt]
    for user_text in turns:
        messages.append({"role": "user", "content": user_text})
        while True:  # a reply that calls tools gets their results, then replies again
            reply = session.reply(session.chat_ids(messages, tools))
            content, calls = _calls_of(reply) if tools else (reply, [])
            messages.append({"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})})
            if not calls or not interactive:
                break
            for call in calls:
                arguments = json.dumps(call["function"]["arguments"], ensure_ascii=False)
                result = input(f"result of {call['function']['name']}({arguments})> ")
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})


def _read_tools(path: str) -> list[dict]:
    try:
        return check_tools(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:
        raise SystemExit(f"--tools {path}: {error}") from None


def _calls_of(reply: str) -> tuple[str, list[dict]]:
    """A reply's content and calls (ids given); a call that does not parse leaves it all content."""
    try:
        content, calls = parse_calls(reply)
    except CallNotParsed:
        return reply, []
    return (content, check_calls(calls, "the reply", None)) if calls else (reply, [])


def _read_turns():
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            return
        if text in {"exit", "quit"}:
            return
        if text:
            yield text


def run_export(args) -> None:
    from contextlib import ExitStack

    chosen = "hf" if args.command == "export-hf" else args.format or ("gguf" if args.destination.endswith(".gguf") else "hf")
    with ExitStack() as loading:
        source = args.source
        if not Path(source).is_dir() or is_adapter_dir(source):
            from minimind import tracking  # MLflow, imported only when a command needs it (seconds)

            source = loading.enter_context(tracking.resolved_model(source))
        if chosen == "gguf":
            destination = export_gguf(source, args.destination, quant=args.quant)
            print(f"wrote {destination} ({destination.stat().st_size / 2**20:.1f} MiB, {args.quant}): "
                  f"llama-cli -m {destination} -cnv, or llama_cpp.Llama(model_path={str(destination)!r})")
        else:
            destination = export_hf(source, args.destination)
            print(f"wrote {destination}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(destination)!r})")


def run_merge_lora(args) -> None:
    import tempfile

    from minimind import tracking  # MLflow, imported only when a command needs it (seconds)

    with tempfile.TemporaryDirectory(prefix="minimind-merge-") as scratch:  # the downloads, removed however this ends
        work = Path(scratch)
        adapter = tracking.resolve_model(args.adapter, work / "adapter", merge_adapters=False)
        if not is_adapter_dir(adapter):
            raise SystemExit(f"minimind merge-lora: {args.adapter} holds no LoRA adapters ({ADAPTER_CONFIG_NAME} is missing)")
        base = args.base or LoRAConfig.load(adapter / ADAPTER_CONFIG_NAME).base
        if not base:
            raise SystemExit(f"minimind merge-lora: {args.adapter} names no base model; pass --base")
        destination = merge_adapter_dir(adapter, tracking.resolve_model(base, work / "base"), args.destination)
    print(f"wrote {destination}: {base} with the adapters of {args.adapter} merged in")


def run_import(args) -> None:
    from dataclasses import asdict

    overrides = {k: v for k, v in asdict(PRESETS[args.preset]).items() if k != "extra"} if args.preset else {}
    overrides.update(parse_overrides(args.config_overrides))
    markers = dict(item.split("=", 1) for item in (args.markers or "").split(",") if item)
    destination = import_model(args.source, args.destination, args.tokenizer, overrides, markers)
    print(f"wrote {destination}: use it as --init {destination} for any stage, or with chat, export-hf and Serve")
    if args.register_as:
        import mlflow

        from minimind import tracking  # MLflow, imported only when a command needs it (seconds)

        tracking.configure()
        with mlflow.start_run(run_name=f"import-{Path(args.source).name}") as run:
            mlflow.log_params({"source": str(Path(args.source).resolve()), **{f"override.{k}": v for k, v in overrides.items()}})
            version = tracking.register_model_dir(destination, args.register_as, run_id=run.info.run_id)
        print(f"registered models:/{args.register_as}/{version.version}")


def run_eval(args) -> None:
    from minimind.driver.eval_flags import evaluate_and_record
    from minimind.driver.harness import run_harness

    evaluate_and_record(args, lambda model, tasks, settings: run_harness(model, tasks, args.include_path, **settings))


def run_demo(args) -> None:
    model_tour.run(preset=args.preset, steps=args.steps, output=Path(args.output))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        {
            "generate": run_generate,
            "chat": run_chat,
            "export": run_export,
            "export-hf": run_export,
            "merge-lora": run_merge_lora,
            "import": run_import,
            "eval": run_eval,
            "demo": run_demo,
        }[args.command](args)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"minimind {args.command}: {error}") from error
    except Exception as error:
        if type(error).__module__.startswith("mlflow."):  # the tracking store's answer, as one line rather than a traceback
            from minimind.tracking import first_line

            raise SystemExit(f"minimind {args.command}: {first_line(error)}") from error
        raise


if __name__ == "__main__":
    main()
