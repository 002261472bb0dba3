"""Data preparation at MiniMind's scale: generated MiniMind-format files of --size-mb each, prepared over
Ray (minimind.data.prepare) against the tokenizer's own ceiling, peak memory per process while preparing, an
SFT job's start-up when its data is prepared already, and training tokens/s with the prepared-shard
reader vs the in-process `datasets` reader.

    python bench/data.py                                             # 1 GiB files: run on a quiet machine
    python bench/data.py --also-mb 4096                              # + a 4 GiB pretrain file for the memory figure
    python bench/data.py --size-mb 30 --ceiling-mb 10 --train-records 2000      # a quick check
    python bench/data.py --size-mb 30 --parts ceiling prepare        # only some of the measurements
    python bench/data.py --size-mb 30 --chunk-mb 4 --parts ceiling prepare      # small files over several tasks

A file smaller than prepare's chunk (32 MiB) is one Ray task on one core while the ceiling uses them all:
compare small files with --chunk-mb 4. Disk: the two files, their shards (about half their size) and,
with --also-mb, that file (its shards are deleted after it is measured).

What each part measures (all files and folders live under --out, default bench/results/data/, git-ignored):

- generate: a pretrain file of {"text"} records (200-600 characters of Chinese with some Latin words,
  numbers and punctuation, like pretrain_hq.jsonl) and a multi-turn SFT file of {"conversations"} (an
  optional system turn, 1-3 user/assistant turns, replies 50-400 characters, like sft_mini_512), built
  from a seeded pool of sentences; at most --size-mb MiB each, whole lines (the first records do not
  depend on the size; 1024 MiB is 1.07 GB).
  A third, token-dense pretrain file (`dense`: 200-600 CJK characters drawn uniformly from the whole
  block, about 0.65M tokens per MiB with the bench tokenizer, 2.6x the pretrain file's) weighs the work after tokenizing most.
  --files picks which of the three the ceiling and prepare parts measure.
  Cached: a second run finds them. A 6400-token tokenizer (`train_tokenizer`) is trained on the first
  --tokenizer-lines records of the pretrain file, also cached.
- ceiling: the HF `tokenizers` fast tokenizer alone, `encode_batch(texts, add_special_tokens=False)`
  with TOKENIZERS_PARALLELISM=true on all cores, over the first --ceiling-mb MB of each file: the text
  preparation tokenizes (pretrain: <s> + text + </s>; SFT: the chat-template rendering, rendered outside
  the timed region). MB/s counts the JSONL bytes of the records sampled, as prepare's MB/s counts the
  file's. Its tokens are before any seq_len cut (prepare's SFT tokens are after it). Also its CPU
  seconds (`time.process_time`), and for text `encode_batch_fast` (the call prepare makes for
  pretraining text: the same ids without offsets).
- prepare: each file with `prepare()` in a fresh process with a fresh `ray.init(num_cpus=os.cpu_count())`
  into <out>/storage/prepared, the file's prepared folder deleted first (nothing reused), then the same
  call again (reused: its seconds are printed too). Peak RSS: a thread of that process samples every
  0.2 s itself (the driver) and every process below it (Ray's own processes and its workers: command
  line with `ray::` or `default_worker.py`), keeping each pid's largest RSS. Other Ray instances on the
  machine are not descendants and are not counted. The same thread adds up the CPU seconds of the driver
  and the workers: "CPU vs ceiling" compares MB per CPU second with the ceiling's, a figure that holds
  on a machine other work loads too (wall-clock MB/s does not). Targets: >= 0.6x the ceiling's MB/s, <= 2 GiB per
  process.
- startup: `jobs/pretrain.py` once (demo preset, 1 step, the pretrain file and tokenizer: it finds the
  pretrain file prepared by the bench), then `jobs/sft.py --init models:/minimind-pretrain/latest`
  (5 steps) on the SFT file, whose shards the bench prepared; both with --storage-path <out>/storage,
  MLFLOW_TRACKING_URI=sqlite:////<out>/mlflow.db and MINIMIND_HOME=<out>/home, so the project's own
  store and checkpoints are untouched. Measured: wall time from starting the SFT process to its first
  "step     1/" line, Ray's own start-up (`ray.init()` in a bare `python -c`), and the difference
  (target <= 15 s). Logs: <out>/logs/.
- train: the first --train-records records of the SFT file, trained in one process on the same model
  (--preset, batch 16, seq_len 512, bf16 autocast, AdamW, grad clipping; torch threads = all cores):
  (a) today's reader: `load_stage_dataset` (fresh `datasets` cache) + `LengthGroupedBatches` + `collate`
  in the training thread; (b) the new one: `prepare()` of the same file (in its own Ray process, before)
  + `PreparedRows` + `micro_batches` with a DataLoader of --loader-workers process(es). The same batches
  in the same order, rounds alternating, --warmup untimed steps then --steps timed steps per round;
  tokens/s counts non-padding tokens. The one-off costs are separate: (a) the time until its first batch,
  (b) prepare's seconds.

Prints three tables and writes bench/results/data-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the ceiling uses every core (prepare's tasks set it false themselves)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS_DIR, print_table, write_results  # noqa: E402

GENERATOR_VERSION = 2  # part of the generated files' names: bump when the generator changes what it writes
BLOCK_RECORDS = 4096  # records per generated block (each block has its own seed: the prefix never depends on the size)
MB = 1e6  # throughput in MB/s, as prepare's own line reports it
GiB = 1 << 30
PARTS = ("ceiling", "prepare", "startup", "train")
FILE_KINDS = ("pretrain", "sft", "dense")  # dense: pretraining text of random CJK characters (stage "pretrain")


# --------------------------------------------------------------------------- generated MiniMind-format files

LATIN = ["AI", "GPU", "CPU", "Python", "Transformer", "token", "Linux", "HTTP", "JSON", "API", "Ray", "PyTorch", "LLM", "5G",
         "OK", "MiniMind", "NLP", "USB", "Wi-Fi", "DNA", "NASA", "deep learning", "e.g.", "iPhone", "Excel", "CEO", "SQL", "RAM",
         "the \"best\" choice", "C++", "x86", "Hello World", "version 2.0", "Q&A", "html", "GitHub", "vs.", "A/B test"]


def sentence_pool(seed: int, sentences: int = 60_000) -> tuple[list[str], list[int]]:
    """Sentences of 6-45 characters from a Zipf-weighted vocabulary of Chinese words, with a few Latin
    words, numbers, quotes, brackets and line breaks; each JSON-escaped (without its quotes), and its
    length in characters."""
    import random

    rng = np.random.default_rng([seed, 7])
    chars = [chr(c) for c in rng.choice(np.arange(0x4E00, 0x9FA6), 3500, replace=False)]
    char_p = 1.0 / (np.arange(len(chars)) + 20.0)
    word_lengths = rng.choice([1, 2, 3, 4], 40_000, p=[0.3, 0.5, 0.12, 0.08])
    flat = rng.choice(len(chars), int(word_lengths.sum()), p=char_p / char_p.sum())
    cuts = np.cumsum(word_lengths)[:-1]
    words = ["".join(chars[i] for i in word) for word in np.split(flat, cuts)]
    word_p = 1.0 / (np.arange(len(words)) + 50.0) ** 1.05
    stream = rng.choice(len(words), sentences * 24, p=word_p / word_p.sum()).tolist()
    pick = random.Random(f"{seed}-pool")
    escaped, lengths, cursor = [], [], 0
    for _ in range(sentences):
        target, pieces, length, clause = pick.randint(6, 45), [], 0, pick.randint(5, 14)
        since = 0
        while length < target:
            roll = pick.random()
            if roll < 0.05:
                piece = pick.choice(LATIN)
                piece = f" {piece} " if pick.random() < 0.3 else piece
            elif roll < 0.07:
                piece = str(pick.randint(0, 9999)) + pick.choice(["", "年", "个", "%", "元", "米"])
            else:
                piece = words[stream[cursor % len(stream)]]
                cursor += 1
            pieces.append(piece)
            length, since = length + len(piece), since + len(piece)
            if since >= clause and length < target:
                pieces.append(pick.choice("，，，、；："))
                since, clause = 0, pick.randint(5, 14)
        text = "".join(pieces)
        roll = pick.random()
        if roll < 0.04:
            text = f"“{text}”"
        elif roll < 0.06:
            text = f"{text[: len(text) // 2]}（{text[len(text) // 2 :]}）"
        text += pick.choice(["。"] * 8 + ["！", "？", "……"]) + ("\n" if pick.random() < 0.03 else "")
        escaped.append(json.dumps(text, ensure_ascii=False)[1:-1])
        lengths.append(len(text))
    return escaped, lengths


def _dense_lines(rng) -> list[str]:
    """Token-dense pretraining text: 200-600 CJK characters drawn uniformly from the whole block, so most
    are outside the tokenizer's merges (about 0.65M tokens per MiB with the bench's 6400-token BPE, 2.6x the
    pretrain file's; the demo tokenizer gives about 0.9M): the work after tokenizing weighs most here."""
    lengths = rng.integers(200, 600, BLOCK_RECORDS)
    codes = rng.integers(0x4E00, 0x9FA6, int(lengths.sum()), dtype=np.uint32)
    text = codes.astype("<u4").tobytes().decode("utf-32-le")
    cuts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    return ['{"text": "' + text[start:end] + '"}\n' for start, end in zip(cuts, cuts[1:])]


def _block_lines(kind: str, block: int, seed: int, pool: tuple[list[str], list[int]]) -> list[str]:
    escaped, lengths = pool
    rng = np.random.default_rng([seed, FILE_KINDS.index(kind) + 1, block])
    if kind == "dense":
        return _dense_lines(rng)
    stream = rng.integers(0, len(escaped), BLOCK_RECORDS * 48).tolist()
    size, cursor = len(stream), 0
    lines = []

    def take(target: int) -> str:
        nonlocal cursor
        parts, length = [], 0
        while length < target:
            index = stream[cursor % size]
            cursor += 1
            parts.append(escaped[index])
            length += lengths[index]
        return "".join(parts)

    if kind == "pretrain":
        for target in rng.integers(200, 600, BLOCK_RECORDS).tolist():
            lines.append('{"text": "' + take(target - 12) + '"}\n')  # - half a sentence: 200-600 characters
        return lines
    systems = (rng.random(BLOCK_RECORDS) < 0.2).tolist()
    turns = rng.integers(1, 4, BLOCK_RECORDS).tolist()
    questions = rng.integers(8, 120, (BLOCK_RECORDS, 3)).tolist()
    replies = rng.integers(50, 380, (BLOCK_RECORDS, 3)).tolist()
    for system, count, question, reply in zip(systems, turns, questions, replies):
        messages = [f'{{"role": "system", "content": "{take(10)}"}}'] if system else []
        for turn in range(count):
            messages.append(f'{{"role": "user", "content": "{take(question[turn])}"}}')
            messages.append(f'{{"role": "assistant", "content": "{take(reply[turn])}"}}')
        lines.append('{"conversations": [' + ", ".join(messages) + "]}\n")
    return lines


def generate(kind: str, size_mb: int, seed: int, out: Path, pool=None) -> dict:
    """The cached file of `kind` (`pretrain`/`sft`/`dense`) of at most size_mb MiB (the whole lines that fit), written
    now if missing. At most: a file just over a multiple of prepare's chunk size puts a chunk cut in its last
    line, where `minimind.data.prepare.chunk_bounds` (as of this writing) loops forever."""
    path = out / f"{kind}-{size_mb}mb-s{seed}-v{GENERATOR_VERSION}.jsonl"
    if path.is_file():
        return {"path": str(path), "bytes": path.stat().st_size, "seconds": None}
    out.mkdir(parents=True, exist_ok=True)
    pool = pool or sentence_pool(seed)
    target, written, records = size_mb << 20, 0, 0
    started = time.perf_counter()
    partial = path.with_suffix(f".partial-{os.getpid()}")
    with partial.open("wb", buffering=0) as file:
        block, full = 0, False
        while not full:
            lines = _block_lines(kind, block, seed, pool)
            data = "".join(lines).encode()
            used = len(lines)
            if written + len(data) > target:  # the last block: the lines that still fit
                data, used, full = bytearray(), 0, True
                for line in lines:
                    encoded = line.encode()
                    if written + len(data) + len(encoded) > target:
                        break
                    data += encoded
                    used += 1
            file.write(data)
            written += len(data)
            records += used
            block += 1
    partial.rename(path)
    seconds = time.perf_counter() - started
    print(f"[generate] {path.name}: {written / MB:,.0f} MB, {records:,} records in {seconds:.1f}s "
          f"({written / MB / seconds:.0f} MB/s)")
    return {"path": str(path), "bytes": written, "records": records, "seconds": seconds}


def first_records(source: str, count: int, destination: Path) -> Path:
    """The first `count` lines of `source` as their own file (cached)."""
    if not destination.is_file():
        partial = destination.with_suffix(f".partial-{os.getpid()}")
        with open(source, "rb") as lines, partial.open("wb") as out:
            for number, line in enumerate(lines):
                if number >= count:
                    break
                out.write(line)
        partial.rename(destination)
    return destination


def bench_tokenizer(pretrain: str, lines: int, seed: int, out: Path) -> Path:
    """A 6400-token `train_tokenizer` trained on the first `lines` records of the pretrain file (cached)."""
    with open(pretrain, "rb") as file:
        texts = [json.loads(line)["text"] for _, line in zip(range(lines), file)]
    folder = out / f"tokenizer-s{seed}-v{GENERATOR_VERSION}-{len(texts)}lines"
    if (folder / "tokenizer.json").is_file():
        return folder
    from minimind.model.tokenizer import train_tokenizer

    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, vocab_size=6400)
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    tokenizer.save_pretrained(str(partial))
    partial.rename(folder)
    print(f"[tokenizer] trained on {len(texts):,} records in {time.perf_counter() - started:.1f}s -> {folder}")
    return folder


# --------------------------------------------------------------------------- the ceiling: the tokenizer alone


def ceiling(path: str, kind: str, tokenizer, sample_mb: float, batch: int = 8192) -> dict:
    """MB/s and tokens/s of `encode_batch` on all cores over the first `sample_mb` MB of the file."""
    texts, sampled = [], 0
    with open(path, "rb") as lines:
        for line in lines:
            if sampled >= sample_mb * MB:
                break
            sampled += len(line)
            record = json.loads(line)
            if kind == "pretrain":
                texts.append((tokenizer.bos_token or "") + record["text"] + (tokenizer.eos_token or ""))
            else:
                texts.append(tokenizer.apply_chat_template(record["conversations"], tokenize=False))
    backend, seconds, tokens = tokenizer.backend_tokenizer, 0.0, 0
    backend.encode_batch(texts[:256], add_special_tokens=False)  # warm-up: the thread pool starts
    cpu_seconds = 0.0
    for start in range(0, len(texts), batch):
        began, began_cpu = time.perf_counter(), time.process_time()
        encodings = backend.encode_batch(texts[start : start + batch], add_special_tokens=False)
        seconds += time.perf_counter() - began
        cpu_seconds += time.process_time() - began_cpu
        tokens += sum(len(encoding.ids) for encoding in encodings)
        del encodings
    fast = {}
    if kind == "pretrain" and hasattr(backend, "encode_batch_fast"):  # what prepare calls for text: the same ids, no offsets
        began, began_cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(texts), batch):
            backend.encode_batch_fast(texts[start : start + batch], add_special_tokens=False)
        fast = {"fast_mb_per_s": sampled / MB / (time.perf_counter() - began),
                "fast_mb_per_cpu_s": sampled / MB / (time.process_time() - began_cpu)}
    return {**fast, "records": len(texts), "mb": sampled / MB, "seconds": seconds, "tokens": tokens,
            "mb_per_s": sampled / MB / seconds, "tokens_per_s": tokens / seconds, "cpu_seconds": cpu_seconds,
            "mb_per_cpu_s": sampled / MB / cpu_seconds}


# --------------------------------------------------------------------------- prepare, in a fresh Ray process


class PeakRSS:
    """A thread sampling the RSS of this process and of every process below it every `interval` seconds,
    and the CPU seconds each used meanwhile (the work done, whatever else loads the machine)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.root, self.interval = psutil.Process(), interval
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.sample()
        for entry in self.peaks.values():  # processes alive before: only their CPU from now on counts
            entry["cpu_start"] = entry["cpu"]
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self):
        import psutil

        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                rss, arguments, times = process.memory_info().rss, process.cmdline(), process.cpu_times()
            except psutil.Error:
                continue
            command = " ".join(arguments)
            entry = self.peaks.setdefault(
                process.pid, {"rss": 0, "worker": False, "name": _short_name(arguments), "cpu_start": 0.0}
            )
            entry["cpu"] = (
                times.user + times.system + (times.children_user + times.children_system if process == self.root else 0)
            )
            if "ray::" in command or "default_worker.py" in command:
                entry["worker"] = True
            if "ray::" in command and command.strip() != "ray::IDLE":
                entry["name"] = command.strip()[:60]  # the task it ran
            entry["rss"] = max(entry["rss"], rss)

    def summary(self) -> dict:
        driver = self.peaks.get(self.root.pid, {"rss": 0})["rss"]
        workers = [entry for entry in self.peaks.values() if entry["worker"]]
        system = [entry for pid, entry in self.peaks.items() if pid != self.root.pid and not entry["worker"]]
        top = max(workers, key=lambda entry: entry["rss"], default={"rss": 0, "name": ""})
        top_system = max(system, key=lambda entry: entry["rss"], default={"rss": 0, "name": ""})
        return {
            "driver_rss": driver,
            "worker_rss": top["rss"],
            "worker_name": top["name"],
            "workers": len(workers),
            "system_rss": top_system["rss"],
            "system_name": top_system["name"],
            "work_cpu_seconds": sum(
                e["cpu"] - e["cpu_start"] for pid, e in self.peaks.items() if e["worker"] or pid == self.root.pid
            ),
            "system_cpu_seconds": sum(e["cpu"] - e["cpu_start"] for e in system),
        }


def _short_name(arguments: list[str]) -> str:
    """`raylet`, `gcs_server`, `agent.py`, `ray::IDLE`...: what a process of Ray's is, from its command line."""
    if not arguments:
        return "?"
    if arguments[0].startswith("ray::"):
        return " ".join(arguments)[:60]
    scripts = [Path(a).name for a in arguments[1:] if a.endswith(".py")]
    return scripts[0] if "python" in Path(arguments[0]).name and scripts else Path(arguments[0]).name


def prepare_in_fresh_ray(
    path: str,
    kind: str,
    tokenizer_dir: str,
    root: str,
    seq_len: int,
    fresh: bool = True,
    chunk_mb: int | None = None,
    again: bool = True,
) -> dict:
    """In a process of its own (spawned): a fresh local Ray instance, `prepare()` of `path` (its folder
    deleted first when `fresh`), sampled for peak RSS; then the same call again, which reuses it."""
    import ray

    from minimind.data.prepare import prepare, prepared_location
    from minimind.data.rows import StageData
    from minimind.model.tokenizer import load_tokenizer

    tokenizer, stage = load_tokenizer(tokenizer_dir), StageData(kind, seq_len=seq_len)
    location, _ = prepared_location(path, tokenizer, stage, root)
    if fresh and Path(location).exists():
        shutil.rmtree(location)
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    ray_seconds = time.perf_counter() - started
    kwargs = {"chunk_bytes": chunk_mb << 20} if chunk_mb else {}
    with PeakRSS() as memory:
        started = time.perf_counter()
        prepared = prepare(path, tokenizer, stage, root, **kwargs)
        seconds = time.perf_counter() - started
    reused_seconds = None
    if again:
        started = time.perf_counter()
        reused = prepare(path, tokenizer, stage, root, **kwargs)
        reused_seconds = time.perf_counter() - started
        assert reused.reused, "the second call prepared the file again"
    ray.shutdown()
    manifest = prepared.manifest
    size = os.path.getsize(path)
    return {
        "path": path,
        "kind": kind,
        "location": prepared.location,
        "reused": prepared.reused,
        "ray_init_seconds": ray_seconds,
        "seconds": seconds,
        "prepare_seconds": prepared.seconds,
        "reused_seconds": reused_seconds,
        "mb": size / MB,
        "mb_per_s": size / MB / seconds,
        "tokens": manifest["tokens"],
        "tokens_per_s": manifest["tokens"] / seconds,
        "rows": manifest["rows"],
        "records": manifest["records"],
        "shards": len(manifest["shards"]),
        "truncated": manifest["report"].get("truncated"),
        **memory.summary(),
    }


def in_child(function, *args, **kwargs):
    """`function(*args, **kwargs)` in a fresh spawned Python process (its own Ray instance, its own memory)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()


# --------------------------------------------------------------------------- a stage job's start-up


def ray_startup_seconds() -> float:
    command = "import ray, time; t=time.time(); ray.init(); print(time.time()-t)"
    done = subprocess.run(
        [sys.executable, "-c", command],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": ""},
    )
    return float(done.stdout.strip().splitlines()[-1])


def run_job(arguments: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run a stage job to its end, streaming its output to `log`; when each marker line first appeared."""
    started = time.perf_counter()
    seen: dict[str, float] = {}
    markers = {
        "ray_started": "Started a local Ray instance",
        "prepared_already": "prepared already",
        "prepared_now": "chunk(s) over the Ray cluster",
        "data_checked": "training rows",
        "first_step": "step     1/",
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, *arguments],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            for line in process.stdout:
                now = time.perf_counter() - started
                out.write(f"{now:8.2f} {line}")
                for name, text in markers.items():
                    if text in line and name not in seen:
                        seen[name] = now
        finally:
            code = process.wait()
            timer.cancel()
    total = time.perf_counter() - started
    if code != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(
            f"{' '.join(arguments)} exited with {code} after {total:.0f}s; its log {log} ends:\n" + "\n".join(tail)
        )
    return {"seconds": total, **{f"{name}_at": seen.get(name) for name in markers}, "log": str(log)}


def startup(pretrain: str, sft: str, tokenizer_dir: str, out: Path, seq_len: int, timeout: float) -> dict:
    storage, home = out / "storage", out / "home"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{(out / 'mlflow.db').resolve()}",
        "MINIMIND_HOME": str(home.resolve()),
        "PYTHONUNBUFFERED": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("TOKENIZERS_PARALLELISM")  # the jobs as a user runs them
    common = ["--seq-len", str(seq_len), "--log-every", "1", "--storage-path", str(storage.resolve())]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    pretrain_job = run_job(
        ["jobs/pretrain.py", "--data", pretrain, "--tokenizer", tokenizer_dir, "--preset", "demo", "--max-steps", "1", *common],
        env,
        out / "logs" / f"pretrain-{stamp}.log",
        timeout,
    )
    print(
        f"[startup] jobs/pretrain.py (1 step) took {pretrain_job['seconds']:.0f}s; "
        f"its data {'was prepared already' if pretrain_job['prepared_already_at'] is not None else 'was NOT found prepared'}"
    )
    ray_seconds = ray_startup_seconds()
    sft_job = run_job(
        ["jobs/sft.py", "--data", sft, "--init", "models:/minimind-pretrain/latest", "--max-steps", "5", *common],
        env,
        out / "logs" / f"sft-{stamp}.log",
        timeout,
    )
    first = sft_job["first_step_at"]

    def at(name: str) -> str:
        return "never" if sft_job[f"{name}_at"] is None else f"{sft_job[f'{name}_at']:.1f}s"

    print(
        f"[startup] jobs/sft.py: Ray started at {at('ray_started')}, data checked at {at('data_checked')}, step 1 logged at "
        f"{at('first_step')} (a bare ray.init() takes {ray_seconds:.1f}s); whole job {sft_job['seconds']:.0f}s"
    )
    return {
        "ray_init_seconds": ray_seconds,
        "sft_first_step_seconds": first,
        "beyond_ray_seconds": None if first is None else first - ray_seconds,
        "sft_prepared_already": sft_job["prepared_already_at"] is not None,
        "sft_job": sft_job,
        "pretrain_job": pretrain_job,
        "pretrain_prepared_already": pretrain_job["prepared_already_at"] is not None,
    }


# --------------------------------------------------------------------------- training: today's reader vs the shards


def train_readers(
    small: str,
    prepared_location: str,
    tokenizer_dir: str,
    preset: str,
    seq_len: int,
    batch_size: int,
    steps: int,
    warmup: int,
    rounds: int,
    loader_workers: int,
    scratch: str,
) -> dict:
    """In a process of its own (spawned): the same model trained from both readers, rounds alternating."""
    os.environ["HF_DATASETS_CACHE"] = scratch  # a fresh cache: the old path really tokenizes
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the new path forks DataLoader processes
    from functools import partial

    import datasets
    import torch

    from minimind.data.rows import LengthGroupedBatches, StageData, collate, load_stage_dataset, row_lengths
    from minimind.data.shards import PreparedRows
    from minimind.driver.stages import STAGES
    from minimind.model.config import ModelConfig
    from minimind.model.model import MiniMindForCausalLM
    from minimind.model.tokenizer import load_tokenizer
    from minimind.training.loop import batch_tokens, micro_batches

    datasets.disable_progress_bars()
    datasets.config.HF_DATASETS_CACHE = Path(scratch)
    torch.set_num_threads(os.cpu_count())
    tokenizer = load_tokenizer(tokenizer_dir)
    pad = tokenizer.pad_token_id

    # (a) today's: read, validate, tokenize in this process, then rows from the Arrow cache, collated here
    started = time.perf_counter()
    dataset = load_stage_dataset(small, tokenizer, StageData("sft", seq_len=seq_len))
    old_batches = LengthGroupedBatches(row_lengths(dataset), batch_size, seed=0)

    def epochs(sampler):
        for epoch in range(10**6):
            sampler.set_epoch(epoch)
            yield from sampler

    old_order = epochs(old_batches)
    first = collate([dataset[i] for i in next(old_order)], pad)
    old_load = time.perf_counter() - started
    old_order = epochs(old_batches)  # from the start again: both readers go through the same batches

    # (b) the new one: memory-mapped shards, collated by the DataLoader's processes
    started = time.perf_counter()
    rows = PreparedRows(prepared_location)
    new_batches = LengthGroupedBatches(rows.lengths().tolist(), batch_size, seed=0)
    new_open = time.perf_counter() - started
    loader = {
        "collate_fn": partial(collate, pad_id=pad),
        "num_workers": loader_workers,
        "pin_memory": False,
        **({"prefetch_factor": 4, "multiprocessing_context": "fork"} if loader_workers else {}),
    }  # as minimind.training.loop's
    same = row_lengths(dataset) == rows.lengths().tolist()

    config = ModelConfig.from_name(
        preset,
        vocab_size=len(tokenizer),
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    stage = STAGES["sft"]
    trainers = {}
    for name in ("old", "new"):
        torch.manual_seed(0)
        model = MiniMindForCausalLM(config).train()
        trainers[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01))

    def train(name, next_batch) -> tuple[int, float]:
        model, optimizer = trainers[name]
        tokens, began = 0, time.perf_counter()
        for step in range(warmup + steps):
            if step == warmup:
                tokens, began = 0, time.perf_counter()
            batch = next_batch()
            tokens += batch_tokens(batch)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = stage.loss(model, batch, {}, None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return tokens, time.perf_counter() - began

    measured = {"old": [], "new": []}
    consumed = 0
    for _ in range(rounds):
        tokens, seconds = train("old", lambda: collate([dataset[i] for i in next(old_order)], pad))
        measured["old"].append((tokens, seconds))
        stream = micro_batches(rows, new_batches, consumed, loader)  # a fresh DataLoader per round: its start is in the warm-up
        tokens, seconds = train("new", lambda: next(stream))
        stream.close()
        measured["new"].append((tokens, seconds))
        consumed += warmup + steps
    result = {
        "rows": len(rows),
        "old_rows": len(dataset),
        "same_rows": same,
        "old_load_seconds": old_load,
        "new_open_seconds": new_open,
        "first_batch_tokens": batch_tokens(first),
    }
    for name, pairs in measured.items():
        result[f"{name}_tokens_per_s"] = sum(t for t, _ in pairs) / sum(s for _, s in pairs)
        result[f"{name}_round_tokens_per_s"] = [t / s for t, s in pairs]
    return result


# --------------------------------------------------------------------------- main


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def _seconds(value: float | None, digits: int = 1) -> str:
    return "never" if value is None else f"{value:.{digits}f} s"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--size-mb", type=int, default=1024, help="MiB of each generated file (pretrain and SFT)")
    add("--ceiling-mb", type=float, default=128, help="MB of each file the tokenizer-alone ceiling encodes")
    add("--also-mb", type=int, default=0, help="also generate and prepare a pretrain file of this many MiB (memory figure)")
    add("--keep-also", action="store_true", help="keep the --also-mb file's prepared folder (deleted by default: it is big)")
    add("--train-records", type=int, default=20_000, help="SFT records the two readers train on")
    add("--preset", default="demo", help="model of the training comparison")
    add("--seq-len", type=int, default=512)
    add("--batch-size", type=int, default=16)
    add("--steps", type=int, default=20, help="timed training steps per reader per round")
    add("--warmup", type=int, default=3, help="untimed steps at the start of each round")
    add("--rounds", type=int, default=3)
    add(
        "--loader-workers",
        type=int,
        default=0,
        help="DataLoader processes of the new reader (0: the training loop's default for text on a CPU)",
    )
    add("--chunk-mb", type=int, default=None, help="prepare's chunk size in MiB (default: the library's, 32)")
    add("--tokenizer-lines", type=int, default=20_000, help="pretrain records the tokenizer is trained on")
    add("--job-timeout", type=float, default=1800, help="seconds before a stage job is killed")
    add(
        "--files",
        nargs="+",
        choices=FILE_KINDS,
        default=list(FILE_KINDS),
        help="which generated files the ceiling and prepare parts measure (dense: random CJK pretraining text, token-dense)",
    )
    add("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (files are always generated)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=RESULTS_DIR / "data", help="generated files, prepared data, stores and logs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = args.out.resolve()
    root = str(out / "storage" / "prepared")  # the jobs' <storage-path>/prepared: what the bench prepares, they reuse

    from minimind.model.tokenizer import load_tokenizer

    pool, files = None, {}
    wanted = [(kind, kind, args.size_mb) for kind in args.files]
    if args.also_mb:
        wanted.append((f"pretrain {args.also_mb} MiB", "pretrain", args.also_mb))
    for name, file_kind, size in wanted:
        if pool is None and not (out / f"{file_kind}-{size}mb-s{args.seed}-v{GENERATOR_VERSION}.jsonl").is_file():
            pool = sentence_pool(args.seed)
        stage_kind = "sft" if file_kind == "sft" else "pretrain"  # a dense file is pretraining text
        files[name] = {"kind": stage_kind, "file_kind": file_kind, **generate(file_kind, size, args.seed, out, pool)}
    if "pretrain" not in files:  # the tokenizer is trained on it
        files["pretrain"] = {
            "kind": "pretrain",
            "file_kind": "pretrain",
            **generate("pretrain", args.size_mb, args.seed, out, pool),
        }
    tokenizer_dir = str(bench_tokenizer(files["pretrain"]["path"], args.tokenizer_lines, args.seed, out))
    tokenizer = load_tokenizer(tokenizer_dir)
    results: dict = {"args": {**vars(args), "out": str(out)}, "files": files, "tokenizer": tokenizer_dir}

    if "ceiling" in args.parts:
        for name in args.files:
            c = files[name]["ceiling"] = ceiling(files[name]["path"], files[name]["kind"], tokenizer, args.ceiling_mb)
            print(
                f"[ceiling] {name}: {c['mb']:.0f} MB, {c['tokens']:,} tokens in {c['seconds']:.1f}s "
                f"({c['mb_per_s']:.1f} MB/s, {c['tokens_per_s']:,.0f} tokens/s, {c['mb_per_cpu_s']:.2f} MB per CPU s)"
                + (
                    f"; encode_batch_fast {c['fast_mb_per_s']:.1f} MB/s, {c['fast_mb_per_cpu_s']:.2f} MB per CPU s"
                    if "fast_mb_per_s" in c
                    else ""
                )
            )

    if "prepare" in args.parts:
        for name, entry in files.items():
            if name not in args.files and not name.startswith("pretrain "):
                continue
            p = entry["prepare"] = in_child(
                prepare_in_fresh_ray, entry["path"], entry["kind"], tokenizer_dir, root, args.seq_len, chunk_mb=args.chunk_mb
            )
            print(
                f"[prepare] {name}: {p['seconds']:.1f}s ({p['mb_per_s']:.1f} MB/s); reused call {p['reused_seconds']:.2f}s; "
                f"peak RSS driver {_gib(p['driver_rss'])}, workers {_gib(p['worker_rss'])} ({p['workers']} worker processes), "
                f"Ray's own processes {_gib(p['system_rss'])} ({p['system_name']})"
            )
            c = entry.get("ceiling") or files["pretrain"].get(
                "ceiling"
            )  # the --also-mb file: the pretrain file's (the same text)
            if c:
                p["vs_ceiling"] = p["mb_per_s"] / c["mb_per_s"]
                p["cpu_vs_ceiling"] = p["mb"] / p["work_cpu_seconds"] / c["mb_per_cpu_s"]
                print(
                    f"[prepare] {name}: {p['work_cpu_seconds']:.1f} CPU s in the driver and Ray workers "
                    f"({p['mb'] / p['work_cpu_seconds']:.2f} MB per CPU s, the ceiling {c['mb_per_cpu_s']:.2f}: "
                    f"{p['cpu_vs_ceiling']:.2f}x), {p['system_cpu_seconds']:.1f} CPU s in Ray's own processes"
                )
            if name not in FILE_KINDS and not args.keep_also:
                shutil.rmtree(p["location"], ignore_errors=True)

    if "startup" in args.parts:
        if "prepare" not in args.parts:  # the jobs must find both files prepared at --seq-len in their root
            for name in ("pretrain", "sft"):
                in_child(
                    prepare_in_fresh_ray,
                    files[name]["path"],
                    files[name]["kind"],
                    tokenizer_dir,
                    root,
                    args.seq_len,
                    fresh=False,
                    again=False,
                    chunk_mb=args.chunk_mb,
                )
        results["startup"] = startup(
            files["pretrain"]["path"], files["sft"]["path"], tokenizer_dir, out, args.seq_len, args.job_timeout
        )

    if "train" in args.parts:
        source = files["sft"]["path"]
        small = first_records(source, args.train_records, out / f"{Path(source).stem}-first{args.train_records}.jsonl")
        prepared = in_child(
            prepare_in_fresh_ray,
            str(small),
            "sft",
            tokenizer_dir,
            str(out / "train-prepared"),
            args.seq_len,
            again=False,
            chunk_mb=args.chunk_mb,
        )
        scratch = out / f"hf-cache-{os.getpid()}"
        try:
            trained = in_child(
                train_readers,
                str(small),
                prepared["location"],
                tokenizer_dir,
                args.preset,
                args.seq_len,
                args.batch_size,
                args.steps,
                args.warmup,
                args.rounds,
                args.loader_workers,
                str(scratch),
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        results["train"] = {**trained, "records": args.train_records, "prepare_seconds": prepared["seconds"], "prepare": prepared}

    print_tables(results, args)
    print(f"wrote {write_results('data', results)}")


def print_tables(results: dict, args) -> None:
    rows, targets = [], []
    for name, entry in results["files"].items():
        c, p = entry.get("ceiling"), entry.get("prepare")
        row = {"file": name, "MB": f"{entry['bytes'] / MB:,.0f}"}
        if c:
            row |= {"ceiling MB/s": f"{c['mb_per_s']:.1f}", "ceiling tok/s": f"{c['tokens_per_s']:,.0f}"}
        if p:
            row |= {
                "prepare s": f"{p['seconds']:.1f}",
                "prepare MB/s": f"{p['mb_per_s']:.1f}",
                "prepare tok/s": f"{p['tokens_per_s']:,.0f}",
                "reused s": f"{p['reused_seconds']:.2f}",
                "driver peak": _gib(p["driver_rss"]),
                "worker peak": _gib(p["worker_rss"]),
            }
            targets.append((f"{name}: peak RSS per process <= 2 GiB", max(p["driver_rss"], p["worker_rss"]) <= 2 * GiB))
            if "vs_ceiling" in p:
                row["vs ceiling"] = f"{p['vs_ceiling']:.2f}x"
                row["CPU vs ceiling"] = f"{p['cpu_vs_ceiling']:.2f}x"
                targets.append((f"{name}: prepare >= 0.6x the ceiling", p["vs_ceiling"] >= 0.6))
        rows.append(row)
    print()
    print_table(
        rows,
        [
            "file",
            "MB",
            "ceiling MB/s",
            "ceiling tok/s",
            "prepare s",
            "prepare MB/s",
            "prepare tok/s",
            "vs ceiling",
            "CPU vs ceiling",
            "reused s",
            "driver peak",
            "worker peak",
        ],
    )
    if "startup" in results:
        s = results["startup"]
        print()
        print_table(
            [
                {
                    "ray.init() alone": _seconds(s["ray_init_seconds"]),
                    "sft.py to step 1": _seconds(s["sft_first_step_seconds"]),
                    "beyond Ray": _seconds(s["beyond_ray_seconds"]),
                    "data prepared already": "yes" if s["sft_prepared_already"] else "NO",
                    "whole sft.py": _seconds(s["sft_job"]["seconds"], 0),
                }
            ],
            ["ray.init() alone", "sft.py to step 1", "beyond Ray", "data prepared already", "whole sft.py"],
        )
        beyond = s["beyond_ray_seconds"]
        targets.append(("sft.py: first step <= 15 s beyond Ray's start-up", beyond is not None and beyond <= 15))
    if "train" in results:
        t = results["train"]
        print()
        print_table(
            [
                {
                    "reader": "today's: load_stage_dataset + collate in the loop",
                    "tokens/s": f"{t['old_tokens_per_s']:,.0f}",
                    "one-off": f"{t['old_load_seconds']:.1f} s to the first batch",
                    "rows": t["old_rows"],
                },
                {
                    "reader": f"prepared shards + DataLoader ({args.loader_workers} worker)",
                    "tokens/s": f"{t['new_tokens_per_s']:,.0f}",
                    "one-off": f"{t['prepare_seconds']:.1f} s prepare (Ray) + {t['new_open_seconds']:.2f} s open",
                    "rows": t["rows"],
                },
            ],
            ["reader", "tokens/s", "one-off", "rows"],
        )
        rounds = {name: [round(x) for x in t[f"{name}_round_tokens_per_s"]] for name in ("old", "new")}
        print(
            f"new/old: {t['new_tokens_per_s'] / t['old_tokens_per_s']:.2f}x; the same rows in both: {t['same_rows']}; "
            f"tokens/s per round: today's {rounds['old']}, new {rounds['new']}"
        )
    if targets:
        print()
        for text, met in targets:
            print(f"target {'met' if met else 'NOT met'}: {text}")
    results["targets"] = {text: met for text, met in targets}


if __name__ == "__main__":
    main()
