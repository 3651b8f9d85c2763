"""Self-supervised COT data construction with several teacher VLMs (DESIGN section 7).

    python cot_builder.py --data ROOT --split train --teacher toy:describer --teacher toy:counter \
        --teacher toy:terse --out runs/cot/train.jsonl [--rationalize] [--limit N] [--workers N]

The dataset's labels, not people, check the teachers' reasoning:
  1. blind pass    every teacher answers the COT prompt without seeing the label; candidates
                   whose answer equals the label are kept;
  2. cross-check   each candidate's reasoning (answer removed) goes, as text only, to the OTHER
                   teachers, which must name the label from the reasoning alone (votes);
  3. rationalise   (optional) for images no teacher got right, teachers are told the label and
                   asked for reasoning that leads to it (records marked mode "hinted");
  4. select        one candidate per image: most votes, then the shortest reasoning.

Teachers: `openai:URL#MODEL` (any OpenAI-compatible server: vLLM, SGLang, llama.cpp...),
`hf:PATH` (a local transformers VLM), `toy:NAME` (pixel-reading toy teachers). The run appends one
JSONL line per kept record, is resumable, and ends with a summary (printed and written to
OUT.summary.json).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from data import (EMOTIONS, INSTRUCTION, append_jsonl, atomic_write_json, load_image, read_emoset_split,
                  read_jsonl, repair_jsonl_tail)
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
    """A teacher call that failed for good (HTTP error after retries, malformed body...)."""


# ---------------------------------------------------------------------------------------------
# Teachers. Each has a `name` and three batched calls returning one reply per item, where a
# reply is the model's text or a TeacherError (failures are counted, never raised):
#   blind([(id, image)]), from_reasoning([(key, reasoning)]), hinted([(id, image, label)])
# ---------------------------------------------------------------------------------------------
def image_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAITeacher:
    """An OpenAI-compatible /v1/chat/completions endpoint, standard-library HTTP only.

    Retries connection errors, timeouts, 429 and 5xx with exponential backoff (backoff * 2^k);
    any other 4xx is a clear error at once (retrying a bad request cannot help)."""

    def __init__(self, url: str, model: str, workers: int = 8, timeout: float = 120.0, retries: int = 4,
                 backoff: float = 1.0, max_tokens: int = 512, temperature: float = 0.2,
                 api_key_env: str = "OPENAI_API_KEY"):
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else (url if url.endswith("/v1") else url + "/v1") + "/chat/completions"
        self.name, self.model, self.workers = f"openai:{model}", model, workers
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self.api_key = os.environ.get(api_key_env)
        self.calls = Counter()  # attempts / retries / failures, for the summary
        self._lock = threading.Lock()  # worker threads update `calls`; += on a dict item is not atomic

    def _count(self, key: str) -> None:
        with self._lock:
            self.calls[key] += 1

    def chat(self, content) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            self._count("attempts")
            try:
                request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:
                    raise TeacherError(f"{self.name}: HTTP {e.code} from {self.endpoint} (not retried): {detail}") from e
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                self._count("retries")
                time.sleep(self.backoff * 2 ** attempt)
        else:
            raise TeacherError(f"{self.name}: gave up after {self.retries + 1} attempts: {last}")
        try:
            text = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise TeacherError(f"{self.name}: malformed response body: {raw[:200]!r}") from e
        if not isinstance(text, str):
            raise TeacherError(f"{self.name}: response content is not text: {text!r:.200}")
        return text

    def _map(self, contents: list) -> list:
        def call(content):
            try:
                return self.chat(content)
            except TeacherError as e:
                self._count("failures")
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


class HFTeacher:
    """A local transformers VLM (loaded with vlm.py), greedy, batched."""

    def __init__(self, path: str, device: str = "auto", dtype: str | None = None, batch_size: int = 8, max_new_tokens: int = 384):
        import vlm

        self.name = f"hf:{Path(path).name}"
        if dtype is None:  # bf16 halves a 7B teacher's memory on a GPU; on a CPU it is only slower
            dtype = "bfloat16" if vlm.resolve_device(device).type == "cuda" else "float32"
        self.model, self.processor = vlm.load_model(path, dtype, device)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def _generate(self, images: list, prompts: list[str]) -> list:
        import vlm

        replies = []
        for s in range(0, len(prompts), self.batch_size):
            chunk_prompts = prompts[s:s + self.batch_size]
            if images:
                texts = [vlm.chat_prompt(self.processor, p) for p in chunk_prompts]
                replies += vlm.sample_completions(self.model, self.processor, images[s:s + self.batch_size], 1,
                                                  self.max_new_tokens, do_sample=False, prompt=texts).texts
            else:  # text only: no image in the chat
                texts = [self.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                                            add_generation_prompt=True, tokenize=False) for p in chunk_prompts]
                enc = self.processor.tokenizer(texts, return_tensors="pt", padding=True).to(self.model.device)
                out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          eos_token_id=vlm.eos_token_ids(self.model, self.processor))
                replies += self.processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return replies

    def blind(self, items):
        return self._generate([img for _, img in items], [BLIND_PROMPT] * len(items))

    def from_reasoning(self, items):
        return self._generate([], [CHECK_PROMPT.format(reasoning=r) for _, r in items])

    def hinted(self, items):
        return self._generate([img for _, img, _ in items], [HINT_PROMPT.format(label=y) for _, _, y in items])


def make_teacher(spec: str, workers: int = 8):
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
        return OpenAITeacher(url, model, workers=workers)
    raise ValueError(f"teacher spec {spec!r}: expected toy:NAME, hf:PATH or openai:URL#MODEL")


# ---------------------------------------------------------------------------------------------
# The four steps
# ---------------------------------------------------------------------------------------------
def read_reply(reply) -> tuple[str, str | None, str | None]:
    """(outcome, reasoning, label) of a COT reply; outcome is ok / malformed / error."""
    if isinstance(reply, Exception):
        return "error", None, None
    label = normalize_emotion(parse_answer(reply))
    if not format_reward(reply) or label is None:
        return "malformed", None, None
    think = reply[reply.find(THINK_OPEN) + len(THINK_OPEN):reply.find(THINK_CLOSE)].strip()
    return "ok", think, label


def blind_pass(teachers, items, labels) -> tuple[list[list[dict]], dict]:
    """Step 1. Per image, the candidates whose blind answer equals the label; per teacher, outcomes."""
    candidates = [[] for _ in items]
    outcomes = {t.name: [] for t in teachers}
    for teacher in teachers:
        for i, reply in enumerate(teacher.blind(items)):
            outcome, think, answer = read_reply(reply)
            if outcome == "ok":
                outcome = "correct" if answer == labels[i] else "wrong"
            outcomes[teacher.name].append(outcome)
            if outcome == "correct":
                candidates[i].append({"teacher": teacher.name, "think": think, "mode": "blind"})
    return candidates, outcomes


def cross_check(teachers, candidates: list[list[dict]], labels, failures: Counter) -> None:
    """Step 2. Each candidate's reasoning goes to every other teacher, text only; a vote is a
    teacher that names the label from the reasoning alone. Adds `votes` and `voters`."""
    for checker in teachers:
        jobs = [(i, c) for i, cands in enumerate(candidates) for c in cands if c["teacher"] != checker.name]
        replies = checker.from_reasoning([(f"{i}:{c['teacher']}", c["think"]) for i, c in jobs])
        for (i, c), reply in zip(jobs, replies):
            answer = None if isinstance(reply, Exception) else normalize_emotion(parse_answer(reply))
            if answer is None:
                failures[checker.name] += 1
            c["voters"] = c.get("voters", 0) + 1
            c["votes"] = c.get("votes", 0) + int(answer == labels[i])


def rationalise(teachers, items, labels, candidates, failures: Counter) -> None:
    """Step 3. For images without a candidate, ask teachers for reasoning given the label."""
    todo = [i for i, cands in enumerate(candidates) if not cands]
    for teacher in teachers:
        replies = teacher.hinted([(items[i][0], items[i][1], labels[i]) for i in todo])
        for i, reply in zip(todo, replies):
            outcome, think, answer = read_reply(reply)
            if outcome != "ok":
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
def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.jsonl")


def build(records: list[dict], root, teachers, out: Path, rationalize=False, min_votes=0, chunk=32) -> dict:
    """Process records not yet done, appending kept COT records to `out` and one status line per
    image to OUT.progress.jsonl (kept / hinted / dropped, each teacher's blind outcome).
    Returns the summary over the whole output (this run and earlier ones)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prog = progress_path(out)
    cut = repair_jsonl_tail(out) + repair_jsonl_tail(prog)   # a crash can leave one partial line
    if cut:
        print(f"removed {cut} bytes of a partial last line left by an interrupted run")
    done = {r["id"] for r in read_jsonl(out)} if out.exists() else set()
    done |= {r["id"] for r in read_jsonl(prog)} if prog.exists() else set()
    todo = [r for r in records if r["id"] not in done]
    print(f"{len(records)} records, {len(records) - len(todo)} already done, {len(todo)} to do")
    failures = Counter()
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="cot")
    for s in range(0, len(todo), chunk):
        batch = todo[s:s + chunk]
        items = [(r["id"], load_image(root, r)) for r in batch]
        labels = [r["label"] for r in batch]
        candidates, outcomes = blind_pass(teachers, items, labels)
        if rationalize:
            rationalise(teachers, items, labels, candidates, failures)
        cross_check(teachers, candidates, labels, failures)
        for i, r in enumerate(batch):
            best = select(candidates[i], min_votes)
            if best is not None:   # the record first: a crash before its progress line only repeats work
                append_jsonl(out, {"id": r["id"], "image": r["image"], "label": r["label"], "think": best["think"],
                                   "answer": r["label"], "teacher": best["teacher"], "votes": best.get("votes", 0),
                                   "voters": best.get("voters", 0), "mode": best["mode"]})
            append_jsonl(prog, {"id": r["id"], "label": r["label"], "status": "dropped" if best is None else best["mode"],
                                "blind": {name: o[i] for name, o in outcomes.items()}})
        bar.update(len(batch))
    bar.close()
    summary = summarise(out, teachers)
    summary["this_run"] = {"processed": len(todo), "seconds": round(time.perf_counter() - start, 2),
                           "records_per_s": round(len(todo) / max(1e-9, time.perf_counter() - start), 2),
                           "check_or_hint_failures": dict(failures)}
    atomic_write_json(out.with_name(out.name + ".summary.json"), summary)
    return summary


def summarise(out: Path, teachers) -> dict:
    """Kept / hinted / dropped per class and each teacher's blind accuracy and failures."""
    per_class = {c: Counter() for c in EMOTIONS}
    blind = defaultdict(Counter)
    for p in read_jsonl(progress_path(out)):
        per_class[p["label"]][p["status"]] += 1
        for name, outcome in p["blind"].items():
            blind[name][outcome] += 1
    teachers_summary = {}
    for name, c in blind.items():
        answered = c["correct"] + c["wrong"]
        teachers_summary[name] = {"blind_accuracy": round(c["correct"] / answered, 4) if answered else None,
                                  "correct": c["correct"], "wrong": c["wrong"],
                                  "failures": c["malformed"] + c["error"], "malformed": c["malformed"], "errors": c["error"]}
        calls = getattr(next((t for t in teachers if t.name == name), None), "calls", None)
        if calls:
            teachers_summary[name]["http"] = dict(calls)
    totals = Counter()
    for c in per_class.values():
        totals.update(c)
    return {"output": str(out), "images": sum(totals.values()), "kept": totals["blind"], "hinted": totals["hinted"],
            "dropped": totals["dropped"], "per_class": {k: dict(v) for k, v in per_class.items()}, "teachers": teachers_summary}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="EmoSet-layout data root")
    p.add_argument("--split", default="train", choices=["train", "val", "test"], help="split to annotate")
    p.add_argument("--teacher", action="append", required=True, help="toy:NAME | hf:PATH | openai:URL#MODEL; repeat (>= 2 for cross-checks)")
    p.add_argument("--out", required=True, help="output JSONL of COT records (appended; resumable)")
    p.add_argument("--rationalize", action="store_true", help="ask teachers for label-conditioned reasoning where none got it right")
    p.add_argument("--min-votes", type=int, default=0, help="keep only candidates with at least this many cross-check votes")
    p.add_argument("--limit", type=int, help="only the first N records of the split")
    p.add_argument("--workers", type=int, default=8, help="concurrent requests per HTTP teacher")
    p.add_argument("--chunk", type=int, default=32, help="images per processing chunk")
    p.add_argument("--skip-missing", action="store_true", help="skip (and count) entries whose image is missing")
    args = p.parse_args(argv)
    teachers = [make_teacher(spec, args.workers) for spec in args.teacher]
    if len({t.name for t in teachers}) != len(teachers):
        p.error("teacher names must be distinct")
    records, report = read_emoset_split(args.data, args.split, skip_missing=args.skip_missing, limit=args.limit)
    if report["skipped_missing"]:
        print(f"skipped {report['skipped_missing']} entries with missing images")
    summary = build(records, args.data, teachers, Path(args.out), args.rationalize, args.min_votes, args.chunk)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
