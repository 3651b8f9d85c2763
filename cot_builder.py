"""Self-supervised COT data construction with several teacher VLMs: the labels, not people, check the reasoning.

    python cot_builder.py --data ROOT --split train --teacher toy:describer --teacher toy:counter \
        --teacher toy:terse --out runs/cot/train.jsonl [--rationalize] [--limit N] [--workers N]

The dataset's labels, not people, check the teachers' reasoning:
  1. blind pass    every teacher answers the COT prompt without seeing the label; candidates
                   whose answer equals the label are kept;
  2. cross-check   each candidate's reasoning (answer removed) goes, as text only, to the OTHER
                   teachers, which must name the label from the reasoning alone (votes);
  3. rationalize   (optional) for images no teacher got right, teachers are told the label and
                   asked for reasoning that leads to it (records marked mode "hinted");
  4. select        one candidate per image: most votes, then the shortest reasoning.

Teachers: `openai:URL#MODEL` (any OpenAI-compatible server: vLLM, SGLang, llama.cpp...),
`hf:PATH` (a local transformers VLM), `toy:NAME` (pixel-reading toy teachers). The run appends one
JSONL line per kept record, is resumable, and ends with a summary (printed and written to
OUT.summary.json). An image is done only when every teacher's reply was parsed or judged; images
a teacher could not be reached for are listed in OUT.failures.jsonl, retried by the next run, and
make the exit code 3 while any remain.

    python cot_builder.py export --to trl|verl --cot runs/cot/train.jsonl --data ROOT --out DIR

converts the COT records (or, with --split, an EmoSet split) into the RL dataset of TRL's
GRPOTrainer (DIR/train.jsonl) or verl (DIR/train.json), for training beyond one GPU (docs/handoff.md).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.utils
import http.client
import io
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from config import add_config_flags, arg, config_from_args, float_in, int_at_least, output_path_problem, run_cli
from data import (EMOTIONS, INSTRUCTION, DataError, append_jsonl, atomic_write_json, atomic_write_text, load_images,
                  path_in_root, read_cot_records, read_emoset_split, read_jsonl, repair_jsonl_tail)
from rewards import THINK_CLOSE, THINK_OPEN, format_reward, normalize_emotion, parse_answer

BLIND_PROMPT = INSTRUCTION
CHECK_PROMPT = (
    "Someone looked at an image and reasoned about the emotion it evokes:\n\n{reasoning}\n\n"
    "Based only on this reasoning, which emotion does it lead to? Choose one of: " + ", ".join(EMOTIONS) + ". "
    "Reply with one emotion word inside <answer> </answer>."
)
HINT_PROMPT = (
    "This image evokes {label}. Explain step by step what you see in the image that leads to {label}: "
    "think inside <think> </think>, then give <answer>{label}</answer>."
)


class TeacherError(RuntimeError):
    """A reply came but cannot be used (malformed or oversized body, not text): for this image
    the teacher's answer counts as malformed, and the image is still judged (and done)."""


class TransportError(TeacherError):
    """No reply at all: connection refused or reset, deadline passed, 429/5xx after the retries,
    any other 4xx, broken HTTP. The image is NOT done: it is listed in OUT.failures.jsonl, the
    next run retries it, and the exit code says that some remain."""


# ---------------------------------------------------------------------------------------------
# Teachers. Each has a `name` and three batched calls returning one reply per item, where a
# reply is the model's text or a TeacherError (failures are counted, never raised):
#   blind([(id, image)]), from_reasoning([(key, reasoning)]), hinted([(id, image, label)])
# ---------------------------------------------------------------------------------------------
def image_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


class OpenAITeacher:
    """An OpenAI-compatible /v1/chat/completions endpoint, standard-library HTTP only.

    Each attempt has ONE deadline (`timeout` seconds for connect, headers and body together: a
    watchdog shuts the socket when it passes, so a server that drips a byte a second cannot hang
    the run). Connection errors, timeouts, 429 and 5xx are retried with exponential backoff
    (backoff * 2^k), or after the server's Retry-After when it sends one (at most
    `retry_after_cap` seconds); any other 4xx fails at once (retrying a bad request cannot
    help) and its body is printed once per status. A body over `max_reply_bytes`, invalid JSON
    or UTF-8, or a lone surrogate is a malformed reply."""

    def __init__(self, url: str, model: str, workers: int = 8, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 1.0, max_tokens: int = 512, temperature: float = 0.2,
                 api_key_env: str = "OPENAI_API_KEY", max_reply_bytes: int = 2 ** 20, retry_after_cap: float = 60.0):
        url = url.rstrip("/")
        base = url if url.endswith("/v1") else url + "/v1"
        self.endpoint = url if url.endswith("/chat/completions") else base + "/chat/completions"
        parts = urllib.parse.urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"teacher URL {url!r}: only http:// and https:// URLs with a host are accepted")
        self._connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port = parts.hostname, parts.port
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.name, self.model, self.workers = f"openai:{model}", model, workers
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_reply_bytes, self.retry_after_cap = max_reply_bytes, retry_after_cap
        self.max_tokens, self.temperature = max_tokens, temperature
        self.api_key = os.environ.get(api_key_env)
        self.calls = Counter()  # attempts / retries / transport_failures / malformed, for the summary
        self._reported = set()  # (kind) already printed once
        self._lock = threading.Lock()  # worker threads update `calls`; += on a dict item is not atomic

    def _count(self, key: str) -> None:
        with self._lock:
            self.calls[key] += 1

    def _report_once(self, kind: str, message: str) -> None:
        """Print a failure's details the first time this kind (an HTTP status, an error type) occurs."""
        with self._lock:
            if kind in self._reported:
                return
            self._reported.add(kind)
        print(f"{self.name}: {message} (shown once per kind; every occurrence is counted)", file=sys.stderr, flush=True)

    def _post(self, body: bytes, headers: dict) -> tuple[int, object, bytes]:
        """One attempt: (status, headers, body), under one deadline for the whole exchange."""
        conn = self._connection(self._host, self._port, timeout=self.timeout)
        expired, sockets = threading.Event(), []

        def expire():
            expired.set()
            for sock in sockets:   # not conn.sock: http.client drops it once the response owns the socket
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)   # wakes up a blocked read

        watchdog = threading.Timer(self.timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()   # bounded by the socket timeout, which equals the deadline
            sockets.append(conn.sock)
            if expired.is_set():
                raise TimeoutError
            conn.request("POST", self._path, body=body, headers=headers)
            response = conn.getresponse()
            raw = self._read_capped(response)
            if expired.is_set():
                raise TimeoutError
            return response.status, response.headers, raw
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set():
                raise TimeoutError(f"no complete reply within the {self.timeout:g} s deadline (--timeout)") from e
            raise
        finally:
            watchdog.cancel()
            conn.close()

    def _read_capped(self, response) -> bytes:
        """The body, read a socket read at a time; over the cap it is a malformed reply (kept
        memory stays bounded); a body shorter than its Content-Length is an IncompleteRead."""
        declared = response.getheader("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_reply_bytes:
            raise TeacherError(f"{self.name}: reply of {declared} bytes is over the {self.max_reply_bytes}-byte cap")
        chunks, size = [], 0
        while chunk := response.read1(65536):
            size += len(chunk)
            if size > self.max_reply_bytes:
                raise TeacherError(f"{self.name}: reply is over the {self.max_reply_bytes}-byte cap")
            chunks.append(chunk)
        if response.length:   # the connection closed before Content-Length bytes arrived
            raise http.client.IncompleteRead(b"".join(chunks), response.length)
        return b"".join(chunks)

    def chat(self, content) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            self._count("attempts")
            wait = self.backoff * 2 ** attempt
            try:
                status, reply_headers, raw = self._post(body, headers)
            except (OSError, http.client.HTTPException) as e:   # refused, reset, timeout, IncompleteRead...
                last = f"{type(e).__name__}: {e}"
                self._report_once(type(e).__name__, f"{last} from {self.endpoint} (retried up to {self.retries} times)")
            else:
                if 200 <= status < 300:
                    return self._parse(raw)
                detail = raw[:500].decode("utf-8", "replace")
                if status != 429 and status < 500:
                    self._report_once(f"HTTP {status}", f"HTTP {status} from {self.endpoint} (not retried): {detail}")
                    raise TransportError(f"{self.name}: HTTP {status} from {self.endpoint} (not retried): "
                                         f"{detail[:200]}")
                last = f"HTTP {status}: {detail[:200]}"
                self._report_once(f"HTTP {status}",
                                  f"HTTP {status} from {self.endpoint} (retried up to {self.retries} times): {detail}")
                hint = retry_after_seconds(reply_headers.get("Retry-After"))
                if hint is not None:
                    wait = min(hint, self.retry_after_cap)
            if attempt < self.retries:
                self._count("retries")
                time.sleep(wait)
        raise TransportError(f"{self.name}: gave up after {self.retries + 1} attempts: {last}")

    def _parse(self, raw: bytes) -> str:
        try:
            text = json.loads(raw)["choices"][0]["message"]["content"]   # invalid UTF-8 raises here
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:
            raise TeacherError(f"{self.name}: malformed response body: {raw[:200]!r}") from e
        if not isinstance(text, str):
            raise TeacherError(f"{self.name}: response content is not text: {text!r:.200}")
        if not is_valid_text(text):
            raise TeacherError(f"{self.name}: response content holds a lone surrogate: {text!r:.200}")
        return text

    def _map(self, contents: list) -> list:
        def call(content):
            try:
                return self.chat(content)
            except TeacherError as e:
                self._count("transport_failures" if isinstance(e, TransportError) else "malformed")
                return e
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(call, contents))

    def blind(self, items):
        return self._map([[{"type": "image_url", "image_url": {"url": image_data_url(img)}},
                           {"type": "text", "text": BLIND_PROMPT}] for _, img in items])

    def from_reasoning(self, items):
        return self._map([[{"type": "text", "text": CHECK_PROMPT.format(reasoning=r)}] for _, r in items])

    def hinted(self, items):
        return self._map([[{"type": "image_url", "image_url": {"url": image_data_url(img)}},
                           {"type": "text", "text": HINT_PROMPT.format(label=label)}] for _, img, label in items])


def is_valid_text(text: str) -> bool:
    """False for a string that cannot be written as UTF-8 (a lone surrogate such as '\\ud800',
    which JSON allows): it would crash the append of the record, on every rerun."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class HFTeacher:
    """A local transformers VLM (loaded with families.py), greedy, batched."""

    def __init__(self, path: str, device: str = "auto", dtype: str | None = None, batch_size: int = 8,
                 max_new_tokens: int = 384):
        import families

        self.name = f"hf:{Path(path).name}"
        if dtype is None:  # bf16 halves a 7B teacher's memory on a GPU; on a CPU it is only slower
            dtype = "bfloat16" if families.resolve_device(device).type == "cuda" else "float32"
        self.model, self.processor = families.load_model(path, dtype, device)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def _generate(self, images: list, prompts: list[str]) -> list:
        import families
        import vlm

        replies = []
        for s in range(0, len(prompts), self.batch_size):
            chunk_prompts = prompts[s:s + self.batch_size]
            if images:
                texts = [families.chat_prompt(self.processor, p) for p in chunk_prompts]
                replies += vlm.sample_completions(self.model, self.processor, images[s:s + self.batch_size], 1,
                                                  self.max_new_tokens, do_sample=False, prompt=texts).texts
            else:  # text only: no image in the chat
                chats = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in chunk_prompts]
                texts = [self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                         for chat in chats]
                enc = self.processor.tokenizer(texts, return_tensors="pt", padding=True).to(self.model.device)
                out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          eos_token_id=vlm.eos_token_ids(self.model, self.processor))
                new_tokens = out[:, enc["input_ids"].shape[1]:]
                replies += self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return replies

    def blind(self, items):
        return self._generate([img for _, img in items], [BLIND_PROMPT] * len(items))

    def from_reasoning(self, items):
        return self._generate([], [CHECK_PROMPT.format(reasoning=r) for _, r in items])

    def hinted(self, items):
        return self._generate([img for _, img, _ in items], [HINT_PROMPT.format(label=y) for _, _, y in items])


def make_teacher(spec: str, workers: int = 8, **http_options):
    """A teacher from its spec; `http_options` (timeout, retries...) go to openai: teachers."""
    kind, _, rest = spec.partition(":")
    if kind == "toy":
        from toy import ToyTeacher
        return ToyTeacher(rest)
    if kind == "hf":
        return HFTeacher(rest)
    if kind == "openai":
        url, sep, model = rest.rpartition("#")
        if not sep or not url or not model:
            raise ValueError(f"teacher spec {spec!r}: expected openai:URL#MODEL, e.g. openai:http://localhost:8000#Qwen2.5-VL-7B-Instruct")
        return OpenAITeacher(url, model, workers=workers, **http_options)
    raise ValueError(f"teacher spec {spec!r}: expected toy:NAME, hf:PATH or openai:URL#MODEL")


# ---------------------------------------------------------------------------------------------
# The four steps. `lost` (image index -> message) collects transport failures: such an image
# is not judged further, and `build` leaves it to the next run.
# ---------------------------------------------------------------------------------------------
def read_reply(reply) -> tuple[str, str | None, str | None]:
    """(outcome, reasoning, label) of a COT reply; outcome is ok / malformed / error (transport)."""
    if isinstance(reply, TransportError):
        return "error", None, None
    if isinstance(reply, Exception) or not isinstance(reply, str) or not is_valid_text(reply):
        return "malformed", None, None
    label = normalize_emotion(parse_answer(reply))
    if not format_reward(reply) or label is None:
        return "malformed", None, None
    think = reply[reply.find(THINK_OPEN) + len(THINK_OPEN):reply.find(THINK_CLOSE)].strip()
    return "ok", think, label


def blind_pass(teachers, items, labels, lost: dict | None = None) -> tuple[list[list[dict]], dict]:
    """Step 1. Per image, the candidates whose blind answer equals the label; per teacher, outcomes."""
    candidates = [[] for _ in items]
    outcomes = {t.name: [] for t in teachers}
    lost = {} if lost is None else lost
    for teacher in teachers:
        for i, reply in enumerate(teacher.blind(items)):
            outcome, think, answer = read_reply(reply)
            if outcome == "ok":
                outcome = "correct" if answer == labels[i] else "wrong"
            elif outcome == "error":
                lost.setdefault(i, f"blind pass: {reply}")
            outcomes[teacher.name].append(outcome)
            if outcome == "correct":
                candidates[i].append({"teacher": teacher.name, "think": think, "mode": "blind"})
    return candidates, outcomes


def cross_check(teachers, candidates: list[list[dict]], labels, failures: Counter, lost: dict | None = None) -> None:
    """Step 2. Each candidate's reasoning goes to every other teacher, text only; a vote is a
    teacher that names the label from the reasoning alone. Adds `votes` and `voters`.
    An unparseable answer is a voter without a vote (counted in `failures`)."""
    lost = {} if lost is None else lost
    for checker in teachers:
        jobs = [(i, c) for i, cands in enumerate(candidates) if i not in lost
                for c in cands if c["teacher"] != checker.name]
        replies = checker.from_reasoning([(f"{i}:{c['teacher']}", c["think"]) for i, c in jobs])
        for (i, c), reply in zip(jobs, replies):
            if isinstance(reply, TransportError):
                lost.setdefault(i, f"cross-check: {reply}")
                continue
            valid = isinstance(reply, str) and is_valid_text(reply)
            answer = normalize_emotion(parse_answer(reply)) if valid else None
            if answer is None:
                failures[checker.name] += 1
            c["voters"] = c.get("voters", 0) + 1
            c["votes"] = c.get("votes", 0) + int(answer == labels[i])


def rationalize(teachers, items, labels, candidates, failures: Counter, lost: dict | None = None) -> None:
    """Step 3. For images without a candidate, ask teachers for reasoning given the label."""
    lost = {} if lost is None else lost
    todo = [i for i, cands in enumerate(candidates) if not cands and i not in lost]
    for teacher in teachers:
        replies = teacher.hinted([(items[i][0], items[i][1], labels[i]) for i in todo])
        for i, reply in zip(todo, replies):
            outcome, think, answer = read_reply(reply)
            if outcome == "error":
                lost.setdefault(i, f"rationalize: {reply}")
            elif outcome != "ok":
                failures[teacher.name] += 1
            elif answer == labels[i]:
                candidates[i].append({"teacher": teacher.name, "think": think, "mode": "hinted"})


def select(cands: list[dict], min_votes: int) -> dict | None:
    """Step 4. Most votes, then the shortest reasoning (then teacher name, for determinism)."""
    eligible = [c for c in cands if c.get("votes", 0) >= min_votes]
    return min(eligible, key=lambda c: (-c.get("votes", 0), len(c["think"]), c["teacher"])) if eligible else None


# ---------------------------------------------------------------------------------------------
# The run: chunks of images, resumable, summarised
# ---------------------------------------------------------------------------------------------
# Files next to OUT: .progress.jsonl (one line per DONE image: the only thing a rerun skips),
# .failures.jsonl (images this run could not finish: transport failures, unreadable images;
# rewritten by every run, since every run retries them), .summary.json.
EXIT_INCOMPLETE = 3        # some images remain to do because a teacher could not be reached
DEAD_CHUNKS_TO_STOP = 3    # consecutive chunks in which EVERY image failed in transport: stop


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.jsonl")


def failures_path(out: Path) -> Path:
    return out.with_name(out.name + ".failures.jsonl")


def drop_unconfirmed_records(out: Path, done: set) -> int:
    """Remove COT records whose image has no progress line (a kill between the two appends):
    the image is redone, so keeping the record would duplicate it. Returns how many."""
    if not out.exists():
        return 0
    records = list(read_jsonl(out))
    keep = [r for r in records if r["id"] in done]
    if len(keep) < len(records):
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
    return len(records) - len(keep)


def build(records: list[dict], root, teachers, out: Path, with_rationalize=False, min_votes=0, chunk=32) -> dict:
    """Process records not yet done, appending kept COT records to `out` and one status line per
    DONE image to OUT.progress.jsonl (kept / hinted / dropped, each teacher's blind outcome).

    An image is done only when every teacher's reply was parsed or judged. Images with a
    transport failure, and unreadable images, are listed in OUT.failures.jsonl and retried by
    the next run. Returns the summary over the whole output (this run and earlier ones)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prog, fails = progress_path(out), failures_path(out)
    cut = repair_jsonl_tail(out) + repair_jsonl_tail(prog)   # a crash can leave one partial line
    if cut:
        print(f"removed {cut} bytes of a partial last line left by an interrupted run")
    done = {r["id"] for r in read_jsonl(prog)} if prog.exists() else set()
    if dropped := drop_unconfirmed_records(out, done):
        print(f"removed {dropped} COT record(s) written just before an interruption; their images are redone")
    todo = [r for r in records if r["id"] not in done]
    print(f"{len(records)} records, {len(records) - len(todo)} already done, {len(todo)} to do")
    atomic_write_text(fails, "")   # this run retries every earlier failure
    failures, not_done, unreadable, dead_chunks = Counter(), Counter(), {}, 0
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="cot")
    for s in range(0, len(todo), chunk):
        wanted = todo[s:s + chunk]
        batch, images = load_images(root, wanted, unreadable)
        for r in (r for r in wanted if r["id"] in unreadable):
            append_jsonl(fails, {"id": r["id"], "kind": "unreadable", "error": unreadable[r["id"]]})
            not_done["unreadable"] += 1
        items = [(r["id"], img) for r, img in zip(batch, images)]
        labels = [r["label"] for r in batch]
        lost = {}
        candidates, outcomes = blind_pass(teachers, items, labels, lost)
        if with_rationalize:   # a parameter named `rationalize` would hide the function
            rationalize(teachers, items, labels, candidates, failures, lost)
        cross_check(teachers, candidates, labels, failures, lost)
        for i, r in enumerate(batch):
            if i in lost:
                append_jsonl(fails, {"id": r["id"], "kind": "transport", "error": lost[i]})
                not_done["transport"] += 1
                continue
            best = select(candidates[i], min_votes)
            if best is not None:   # the record first; a kill before its progress line is undone at restart
                append_jsonl(out, {"id": r["id"], "image": r["image"], "label": r["label"], "think": best["think"],
                                   "answer": r["label"], "teacher": best["teacher"], "votes": best.get("votes", 0),
                                   "voters": best.get("voters", 0), "mode": best["mode"]})
            append_jsonl(prog, {"id": r["id"], "label": r["label"],
                                "status": "dropped" if best is None else best["mode"],
                                "blind": {name: o[i] for name, o in outcomes.items()}})
        bar.update(len(wanted))
        dead_chunks = dead_chunks + 1 if batch and len(lost) == len(batch) else 0
        if dead_chunks == DEAD_CHUNKS_TO_STOP:
            print(f"stopping early: every image of the last {dead_chunks} chunks failed to reach a teacher "
                  f"(see the errors above and {fails}); run the same command again when the teachers are back",
                  file=sys.stderr)
            not_done["not_started"] = len(todo) - s - len(wanted)
            break
    bar.close()
    summary = summarise(out, teachers)
    summary["not_done"] = {"transport": not_done["transport"], "unreadable": not_done["unreadable"],
                           "not_started": not_done["not_started"], "failures_file": str(fails)}
    processed = len(todo) - not_done["not_started"]
    summary["this_run"] = {"processed": processed, "seconds": round(time.perf_counter() - start, 2),
                           "records_per_s": round(processed / max(1e-9, time.perf_counter() - start), 2),
                           "check_or_hint_failures": dict(failures)}
    atomic_write_json(out.with_name(out.name + ".summary.json"), summary)
    if not_done["transport"] or not_done["unreadable"]:
        print(f"{not_done['transport']} images could not be finished (teacher unreachable) and "
              f"{not_done['unreadable']} images are unreadable: listed in {fails}; a rerun retries them",
              file=sys.stderr)
    return summary


def summarise(out: Path, teachers) -> dict:
    """Kept / hinted / dropped per class and each teacher's blind accuracy and failures."""
    per_class = {c: Counter() for c in EMOTIONS}
    blind = defaultdict(Counter)
    for p in read_jsonl(progress_path(out)) if progress_path(out).exists() else []:
        per_class[p["label"]][p["status"]] += 1
        for name, outcome in p["blind"].items():
            blind[name][outcome] += 1
    teachers_summary = {}
    for name, c in blind.items():
        answered = c["correct"] + c["wrong"]
        teachers_summary[name] = {"blind_accuracy": round(c["correct"] / answered, 4) if answered else None,
                                  "correct": c["correct"], "wrong": c["wrong"],
                                  "failures": c["malformed"] + c["error"], "malformed": c["malformed"],
                                  "errors": c["error"]}
        calls = getattr(next((t for t in teachers if t.name == name), None), "calls", None)
        if calls:
            teachers_summary[name]["http"] = dict(calls)
    totals = Counter()
    for c in per_class.values():
        totals.update(c)
    return {"output": str(out), "images": sum(totals.values()), "kept": totals["blind"], "hinted": totals["hinted"],
            "dropped": totals["dropped"], "per_class": {k: dict(v) for k, v in per_class.items()},
            "teachers": teachers_summary}


SPLITS = ["train", "val", "test"]


@dataclass(frozen=True)
class BuildConfig:
    """Every setting of a COT build (`python cot_builder.py ...`)."""
    data: str = arg(help="EmoSet-layout data root")
    teacher: list[str] = arg(help="toy:NAME | hf:PATH | openai:URL#MODEL; repeat (>= 2 for cross-checks)",
                             action="append")
    out: str = arg(help="output JSONL of COT records (appended; resumable)")
    split: str = arg("train", "split to annotate", choices=SPLITS)
    rationalize: bool = arg(False, "ask teachers for label-conditioned reasoning where none got it right")
    min_votes: int = arg(0, "keep only candidates with at least this many cross-check votes", type=int_at_least(0))
    limit: int | None = arg(None, "only the first N records of the split", type=int_at_least(1))
    workers: int = arg(8, "concurrent requests per HTTP teacher", type=int_at_least(1))
    chunk: int = arg(32, "images per processing chunk", type=int_at_least(1))
    skip_missing: bool = arg(False, "skip (and count) entries whose image is missing")
    # HTTP teachers
    timeout: float = arg(120.0, "seconds per HTTP request, whole reply included", type=float_in(0, lo_open=True))
    retries: int = arg(4, "retries of a failed HTTP request (backoff 1, 2, 4... s)", type=int_at_least(0))
    retry_after_cap: float = arg(60.0, "longest wait honoured from a Retry-After header, seconds", type=float_in(0))
    max_reply_bytes: int = arg(2 ** 20, "larger HTTP replies count as malformed", type=int_at_least(1))


def parse_build_args(argv=None) -> tuple[BuildConfig, list]:
    """The build's config and its teachers (a bad teacher spec is a usage error)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Export the output for TRL or verl: python cot_builder.py export --help")
    add_config_flags(p, BuildConfig)
    cfg = config_from_args(BuildConfig, p.parse_args(argv))
    if problem := output_path_problem(cfg.out, "file"):
        p.error(problem)
    http_options = dict(timeout=cfg.timeout, retries=cfg.retries, retry_after_cap=cfg.retry_after_cap,
                        max_reply_bytes=cfg.max_reply_bytes)
    try:
        teachers = [make_teacher(spec, cfg.workers, **http_options) for spec in cfg.teacher]
    except ValueError as e:
        p.error(str(e))
    if len({t.name for t in teachers}) != len(teachers):
        p.error("teacher names must be distinct")
    return cfg, teachers


def main(argv=None) -> dict:
    cfg, teachers = parse_build_args(argv)
    records, report = read_emoset_split(cfg.data, cfg.split, skip_missing=cfg.skip_missing, limit=cfg.limit)
    if report["skipped_missing"]:
        print(f"skipped {report['skipped_missing']} entries with missing images")
    summary = build(records, cfg.data, teachers, Path(cfg.out), cfg.rationalize, cfg.min_votes, cfg.chunk)
    print(json.dumps(summary, indent=2))
    return summary


def exit_code(summary: dict) -> int:
    """0 when every image is done (or unreadable: warned, listed, counted); EXIT_INCOMPLETE while
    images remain that a teacher could not be reached for (rerun the same command)."""
    return EXIT_INCOMPLETE if summary["not_done"]["transport"] or summary["not_done"]["not_started"] else 0


# ---------------------------------------------------------------------------------------------
# Export: the COT records as the RL dataset of TRL's GRPOTrainer or of verl. Formats checked
# against TRL v1.9.0 and verl v0.7.0 (docs/handoff.md). RL needs only
# the prompt (the one instruction and the image) and the label the rewards check.
# ---------------------------------------------------------------------------------------------
VERL_DATA_SOURCE = "emoset"   # verl's data_source column: names the dataset in its logs and reward calls
VERL_IMAGE_PLACEHOLDER = "<image>"   # verl puts the row's images where these stand in the prompt


def absolute_image_path(record: dict, root) -> str:
    """The record's image as an absolute path: the exported file is read from another working
    folder (a launcher's, a worker's), where a path relative to the data root means nothing."""
    return str(path_in_root(root, record["image"], f"image of {record['id']!r}").resolve())


def trl_row(record: dict, root) -> dict:
    """One row for TRL's GRPOTrainer (a conversational, vision-language dataset):
    prompt   the user turn, as text: GRPOTrainer inserts the image placeholder before the text
    image    absolute path; cast the column with datasets.Image() to give the trainer PIL images
    label    the column trl_accuracy_reward reads (TRL passes every extra column to the rewards)
    id       the record's id"""
    return {"prompt": [{"role": "user", "content": INSTRUCTION}], "image": absolute_image_path(record, root),
            "label": record["label"], "id": record["id"]}


def verl_row(record: dict, root, index: int) -> dict:
    """One row for verl's RL dataset (RLHFDataset): the prompt holds one <image> placeholder
    (image first, then the instruction, as this project's own prompt), `images` one absolute
    path per placeholder, and reward_model.ground_truth the label verl_compute_score checks."""
    return {"data_source": VERL_DATA_SOURCE,
            "prompt": [{"role": "user", "content": VERL_IMAGE_PLACEHOLDER + INSTRUCTION}],
            "images": [absolute_image_path(record, root)],
            "ability": "emotion_recognition",
            "reward_model": {"style": "rule", "ground_truth": record["label"]},
            "extra_info": {"index": index, "id": record["id"]}}


EXPORT_SUFFIX = {"trl": ".jsonl", "verl": ".json"}   # verl reads *.json (JSON Lines inside) or *.parquet


def export_records(records: list[dict], root, to: str, out_dir, name: str) -> Path:
    """Write the records as TRL or verl rows, one JSON object per line, atomically; return the path.
    Both libraries load the file with datasets' "json" builder, which reads one object per line."""
    if to not in EXPORT_SUFFIX:
        raise ValueError(f"export: --to must be one of {sorted(EXPORT_SUFFIX)}, got {to!r}")
    rows = [trl_row(r, root) if to == "trl" else verl_row(r, root, i) for i, r in enumerate(records)]
    path = Path(out_dir) / f"{name}{EXPORT_SUFFIX[to]}"
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


@dataclass(frozen=True)
class ExportConfig:
    """Every setting of `python cot_builder.py export`: the records come from --cot or from --split."""
    to: str = arg(help="the library whose dataset layout to write", choices=sorted(EXPORT_SUFFIX))
    data: str = arg(help="the EmoSet-layout data root the records' image paths are relative to")
    out: str = arg(help="output folder")
    cot: str | None = arg(None, "COT records JSONL written by cot_builder.py (the training prompts)")
    split: str | None = arg(None, "an EmoSet split instead of --cot (e.g. verl's data.val_files)", choices=SPLITS)
    name: str | None = arg(None, "output file name without suffix (default: the --cot file's stem, or the split)")
    skip_invalid: bool = arg(False, "skip (and count) invalid COT records instead of stopping")
    skip_missing: bool = arg(False, "with --split: skip (and count) entries whose image is missing")


def parse_export_args(argv=None) -> ExportConfig:
    p = argparse.ArgumentParser(prog="cot_builder.py export",
                                description="Convert COT records to the RL dataset of TRL's GRPOTrainer or verl.")
    add_config_flags(p, ExportConfig)
    cfg = config_from_args(ExportConfig, p.parse_args(argv))
    if cfg.cot is None and cfg.split is None:   # argparse's own words for a required exclusive group
        p.error("one of the arguments --cot --split is required")
    if cfg.cot is not None and cfg.split is not None:
        p.error("argument --split: not allowed with argument --cot")
    if problem := output_path_problem(cfg.out, "dir"):
        p.error(problem)
    return cfg


def export_main(argv=None) -> int:
    cfg = parse_export_args(argv)
    try:
        if cfg.cot:
            records, report = read_cot_records(cfg.cot, cfg.data, skip_invalid=cfg.skip_invalid)
            skipped = f"{report['skipped_invalid']} invalid records skipped"
        else:
            records, report = read_emoset_split(cfg.data, cfg.split, skip_missing=cfg.skip_missing)
            skipped = f"{report['skipped_missing']} entries with missing images skipped"
    except DataError as e:
        raise SystemExit(f"error: cot_builder.py export: {e}") from None
    name = cfg.name or (Path(cfg.cot).stem if cfg.cot else cfg.split)
    path = export_records(records, cfg.data, cfg.to, cfg.out, name)
    print(f"wrote {len(records)} {cfg.to} rows to {path} ({skipped})")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:
        sys.exit(run_cli(export_main, sys.argv[2:]))
    sys.exit(exit_code(run_cli(main)))
