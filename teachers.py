"""The teachers cot_builder.py asks: `openai:URL#MODEL` (HTTP, retried with backoff), `hf:PATH` (local), `toy:NAME`."""

from __future__ import annotations

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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from data import EMOTIONS, INSTRUCTION

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
        from toy_teachers import ToyTeacher
        return ToyTeacher(rest)
    if kind == "hf":
        return HFTeacher(rest)
    if kind == "openai":
        url, sep, model = rest.rpartition("#")
        if not sep or not url or not model:
            raise ValueError(f"teacher spec {spec!r}: expected openai:URL#MODEL, e.g. openai:http://localhost:8000#Qwen2.5-VL-7B-Instruct")
        return OpenAITeacher(url, model, workers=workers, **http_options)
    raise ValueError(f"teacher spec {spec!r}: expected toy:NAME, hf:PATH or openai:URL#MODEL")
