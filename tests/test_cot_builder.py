"""cot_builder.py: the four steps with toy teachers, the OpenAI-compatible client against a local
fake server, and kill-and-resume."""

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pathlib import Path

from PIL import Image

import cot_builder
import data
import toy
import toy_teachers
from data import read_emoset_split, read_jsonl
from teachers import OpenAITeacher, TeacherError, TransportError, is_valid_text, make_teacher, retry_after_seconds

TEACHERS = ["toy:describer", "toy:counter", "toy:terse"]


def build(toy_data, out, *extra):
    teachers = [flag for t in TEACHERS for flag in ("--teacher", t)]
    return cot_builder.main(["--data", str(toy_data), "--out", str(out), *teachers, *extra])


# ---------------------------------------------------------------------------------------------
# With toy teachers on toy data
# ---------------------------------------------------------------------------------------------
def test_toy_run_keeps_only_true_labels_and_the_summary_adds_up(tmp_path):
    toy_data = tmp_path / "data"   # enough images for teacher accuracies to separate (~0.85 vs ~0.62)
    toy.write_toy_dataset(toy_data, "demo", seed=5, sizes={"train": 240, "val": 0, "test": 0})
    out = tmp_path / "cot.jsonl"
    summary = build(toy_data, out)
    records, _ = read_emoset_split(toy_data, "train")
    labels = {r["id"]: r["label"] for r in records}
    kept = list(read_jsonl(out))
    assert kept, "toy teachers should get most images right"
    for r in kept:
        assert r["answer"] == r["label"] == labels[r["id"]]
        assert r["teacher"] in {f"toy:{n}" for n in ("describer", "counter", "terse")}
        assert r["mode"] == "blind" and r["voters"] == 2 and 0 <= r["votes"] <= 2
        assert r["think"] and "<" not in r["think"]
    assert summary["images"] == len(records) == summary["kept"] + summary["hinted"] + summary["dropped"]
    assert summary["kept"] == len(kept) and summary["hinted"] == 0
    assert sum(c.get("blind", 0) for c in summary["per_class"].values()) == summary["kept"]
    for name, t in summary["teachers"].items():
        assert t["correct"] + t["wrong"] + t["failures"] == len(records), name
    acc = {name: t["blind_accuracy"] for name, t in summary["teachers"].items()}
    assert acc["toy:describer"] > acc["toy:terse"]          # the noisier teacher is less accurate
    # The trained-on file is what sft.py --mode cot reads
    assert json.loads((tmp_path / "cot.jsonl.summary.json").read_text())["kept"] == summary["kept"]


def test_rationalize_fills_images_no_teacher_got_right(tmp_path, toy_data):
    out = tmp_path / "cot.jsonl"
    summary = build(toy_data, out, "--rationalize")
    assert summary["dropped"] == 0 and summary["hinted"] > 0
    hinted = [r for r in read_jsonl(out) if r["mode"] == "hinted"]
    assert len(hinted) == summary["hinted"] and all(r["answer"] == r["label"] for r in hinted)


class ScriptedTeacher:
    """Blind answers and cross-check answers fixed in advance."""

    def __init__(self, name, blind_reply, check_answer):
        self.name, self.blind_reply, self.check_answer = name, blind_reply, check_answer

    def blind(self, items):
        return [self.blind_reply] * len(items)

    def from_reasoning(self, items):
        return [f"<answer>{self.check_answer(text)}</answer>" for _, text in items]

    def hinted(self, items):
        return [RuntimeError("not used")] * len(items)


def test_cross_check_votes_and_selection():
    labels = ["anger"]
    items = [("x", Image.new("RGB", (8, 8)))]
    # Two teachers are right blind; A's reasoning convinces the checkers, B's leads them to fear.
    a = ScriptedTeacher("A", "<think>red on dark, long convincing text</think><answer>anger</answer>",
                        lambda t: "anger" if "red" in t else "fear")
    b = ScriptedTeacher("B", "<think>yellow on dark</think><answer>anger</answer>",
                        lambda t: "anger" if "red" in t else "fear")
    c = ScriptedTeacher("C", "no tags", lambda t: "anger" if "red" in t else "fear")
    candidates, outcomes = cot_builder.blind_pass([a, b, c], items, labels)
    assert outcomes == {"A": ["correct"], "B": ["correct"], "C": ["malformed"]}
    failures = Counter()
    cot_builder.cross_check([a, b, c], candidates, labels, failures)
    votes = {cand["teacher"]: (cand["votes"], cand["voters"]) for cand in candidates[0]}
    assert votes == {"A": (2, 2), "B": (0, 2)}           # B's reasoning lost its votes
    assert cot_builder.select(candidates[0], min_votes=0)["teacher"] == "A"   # despite being longer
    assert cot_builder.select(candidates[0], min_votes=3) is None


# ---------------------------------------------------------------------------------------------
# Kill and resume
# ---------------------------------------------------------------------------------------------
def test_interrupted_run_resumes_with_every_id_once(tmp_path, toy_data, monkeypatch):
    out = tmp_path / "cot.jsonl"
    real_append = data.append_jsonl
    calls = {"n": 0}

    def crashing_append(path, record):
        calls["n"] += 1
        if calls["n"] == 30:  # die mid-write: half a line reaches the disk
            with open(path, "a") as f:
                f.write(json.dumps(record)[:25])
            raise KeyboardInterrupt("killed")
        real_append(path, record)

    monkeypatch.setattr(cot_builder, "append_jsonl", crashing_append)
    with pytest.raises(KeyboardInterrupt):
        build(toy_data, out, "--chunk", "8")
    monkeypatch.setattr(cot_builder, "append_jsonl", real_append)
    summary = build(toy_data, out, "--chunk", "8")
    ids = [r["id"] for r in read_jsonl(out)]            # would raise on a partial line
    assert len(ids) == len(set(ids)) == summary["kept"]
    progress = [r["id"] for r in read_jsonl(cot_builder.progress_path(out))]
    assert sorted(progress) == sorted({r["id"] for r in read_emoset_split(toy_data, "train")[0]})
    fresh = build(toy_data, tmp_path / "fresh.jsonl")
    assert {r["id"] for r in read_jsonl(tmp_path / "fresh.jsonl")} == set(ids) and fresh["kept"] == summary["kept"]


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible client against a local fake server
# ---------------------------------------------------------------------------------------------
class FakeServer:
    """127.0.0.1, random port. `script` is served in order, then 200s with `reply`. An entry is
    (status, body), (status, body, headers), or a callable(handler) that misbehaves at the socket."""

    def __init__(self, script=(), reply="<think>dark and red</think><answer>anger</answer>"):
        self.script, self.requests, self.reply = list(script), [], reply
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization"),
                                        "time": time.monotonic()})
                action = server.script.pop(0) if server.script else (200, None)
                if callable(action):
                    return action(self)
                status, payload, headers = (*action, {})[:3]
                if payload is None:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": server.reply}}]})
                data_ = payload if isinstance(payload, bytes) else payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data_)))
                self.end_headers()
                self.wfile.write(data_)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(*args, **kwargs):
        servers.append(FakeServer(*args, **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def teacher_for(server, **kwargs):
    kwargs = {"backoff": 0.001, "retries": 2, "timeout": 5, **kwargs}
    return OpenAITeacher(server.url, "teacher-7b", **kwargs)


def test_request_carries_model_and_image_data_url(server_factory, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = server_factory()
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    (reply,) = teacher_for(server).blind([("a", img)])
    assert reply == server.reply
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "teacher-7b"
    assert req["auth"] == "Bearer sk-test"
    content = req["body"]["messages"][0]["content"]
    url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (8, 8) and decoded.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    assert any(c["type"] == "text" and "emotion" in c["text"] for c in content)


def test_retries_on_500_and_429_then_succeeds(server_factory):
    server = server_factory([(500, "{}"), (429, "{}")])
    teacher = teacher_for(server)
    assert teacher.chat("hi") == server.reply
    assert len(server.requests) == 3 and teacher.calls["retries"] == 2


def test_retries_stop_at_the_limit(server_factory):
    server = server_factory([(503, "{}")] * 10)
    teacher = teacher_for(server, retries=2)
    with pytest.raises(TeacherError, match="gave up after 3 attempts: HTTP 503"):
        teacher.chat("hi")
    assert len(server.requests) == 3


def test_400_is_reported_clearly_without_retry(server_factory):
    server = server_factory([(400, '{"error": "image too large"}')])
    teacher = teacher_for(server)
    with pytest.raises(TeacherError, match=r"HTTP 400 .*not retried.*image too large"):
        teacher.chat("hi")
    assert len(server.requests) == 1


def test_malformed_bodies_and_failures_are_counted_not_raised(server_factory, tmp_path, toy_data):
    server = server_factory([(200, "not json"), (200, '{"choices": []}'), (400, "{}")])
    teacher = teacher_for(server, workers=1)
    replies = teacher.blind([(str(i), Image.new("RGB", (8, 8))) for i in range(4)])
    assert [type(r).__name__ for r in replies[:3]] == ["TeacherError", "TeacherError", "TransportError"]
    assert replies[3] == server.reply and teacher.calls["malformed"] == 2 and teacher.calls["transport_failures"] == 1
    # In a run: malformed replies are judged (the image is done), nothing crashes, no bad record is written.
    server2 = server_factory([(200, "garbage")] * 3, reply="no tags here")
    http_teacher = teacher_for(server2, workers=2)
    records, _ = read_emoset_split(toy_data, "train", limit=6)
    out = tmp_path / "cot.jsonl"
    summary = cot_builder.build(records, toy_data,
                                [http_teacher, toy_teachers.ToyTeacher("describer", malformed_rate=0)], out)
    t = summary["teachers"][http_teacher.name]
    assert t["malformed"] == 6 and t["errors"] == 0 and t["correct"] == 0 and summary["images"] == 6
    assert all(r["teacher"] == "toy:describer" for r in read_jsonl(out))
    assert summary["not_done"]["transport"] == 0 and cot_builder.exit_code(summary) == 0


# ---------------------------------------------------------------------------------------------
# Faults: outages, slow and broken servers, odd replies (issue: nothing lost, nothing skipped)
# ---------------------------------------------------------------------------------------------
def closed_port_url():
    """A 127.0.0.1 URL where nothing listens: connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_with(teacher, toy_data, out, n=6, chunk=32):
    records, _ = read_emoset_split(toy_data, "train", limit=n)
    teachers = [teacher, toy_teachers.ToyTeacher("describer", malformed_rate=0)]
    return cot_builder.build(records, toy_data, teachers, out, chunk=chunk)


def test_outage_leaves_images_to_do_lists_them_and_the_rerun_finishes(server_factory, tmp_path, toy_data):
    out = tmp_path / "cot.jsonl"
    down = OpenAITeacher(closed_port_url(), "teacher-7b", retries=1, backoff=0.001, timeout=2)
    summary = run_with(down, toy_data, out)
    assert summary["images"] == 0 and summary["not_done"]["transport"] == 6
    assert cot_builder.exit_code(summary) == cot_builder.EXIT_INCOMPLETE
    failed = list(read_jsonl(cot_builder.failures_path(out)))
    assert len(failed) == 6 and all(f["kind"] == "transport" and "ConnectionRefusedError" in f["error"] for f in failed)
    assert not out.exists() or not list(read_jsonl(out))
    # 5xx after the retries: the same
    server = server_factory([(503, "{}")] * 100)
    summary = run_with(teacher_for(server, retries=1), toy_data, out)
    assert summary["not_done"]["transport"] == 6
    assert "HTTP 503" in next(read_jsonl(cot_builder.failures_path(out)))["error"]
    # The teacher is back: the rerun does every image, and the result equals an undisturbed run.
    server.script.clear()
    summary = run_with(teacher_for(server), toy_data, out)
    assert summary["images"] == 6 and summary["not_done"]["transport"] == 0 and cot_builder.exit_code(summary) == 0
    assert list(read_jsonl(cot_builder.failures_path(out))) == []
    run_with(teacher_for(server_factory()), toy_data, tmp_path / "clean.jsonl")
    assert list(read_jsonl(out)) == list(read_jsonl(tmp_path / "clean.jsonl"))


def test_a_dead_teacher_stops_the_run_after_three_chunks(tmp_path, toy_data):
    down = OpenAITeacher(closed_port_url(), "teacher-7b", retries=0, timeout=2)
    summary = run_with(down, toy_data, tmp_path / "cot.jsonl", n=10, chunk=2)
    assert summary["not_done"] == {**summary["not_done"], "transport": 6, "not_started": 4}
    assert cot_builder.exit_code(summary) == cot_builder.EXIT_INCOMPLETE


def test_a_4xx_body_is_printed_once_per_status(server_factory, capsys):
    server = server_factory([(400, '{"error": "image too large"}')] * 3 + [(404, '{"error": "no such model"}')])
    teacher = teacher_for(server, workers=1)
    replies = teacher.from_reasoning([(str(i), "x") for i in range(5)])
    assert [type(r).__name__ for r in replies] == ["TransportError"] * 4 + ["str"]
    err = capsys.readouterr().err
    assert err.count("HTTP 400") == 1 and "image too large" in err
    assert err.count("HTTP 404") == 1 and "no such model" in err


def drip(handler):
    """Headers at once, then one byte every 0.2 s: every single read is quick, the reply never ends."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    try:
        for _ in range(100):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.2)
    except OSError:
        pass


def test_one_deadline_covers_a_slow_drip(server_factory):
    server = server_factory([drip])
    teacher = teacher_for(server, timeout=0.8, retries=0)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="TimeoutError.*0.8 s deadline"):
        teacher.chat("hi")
    assert time.monotonic() - t0 < 3


def test_retry_after_is_honoured_up_to_the_cap(server_factory):
    server = server_factory([(503, "{}", {"Retry-After": "0.5"}), (429, "{}", {"Retry-After": "3600"})])
    teacher = teacher_for(server, retries=2, retry_after_cap=0.3)   # backoff 0.001 s would be instant
    assert teacher.chat("hi") == server.reply
    t = [r["time"] for r in server.requests]
    assert 0.29 <= t[1] - t[0] < 1.5      # min(0.5, cap 0.3)
    assert 0.29 <= t[2] - t[1] < 1.5      # min(3600, cap 0.3)
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0   # a date in the past
    assert retry_after_seconds("soon") is None and retry_after_seconds("2") == 2.0


def chunked_flood(handler):
    """A chunked reply (no Content-Length) that goes on and on."""
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    try:
        for _ in range(64):
            handler.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")
    except OSError:
        pass


def test_replies_over_the_size_cap_are_malformed(server_factory):
    big = json.dumps({"choices": [{"message": {"content": "x" * 5000}}]})
    server = server_factory([(200, big), chunked_flood])
    teacher = teacher_for(server, max_reply_bytes=4096, workers=1)
    replies = teacher.from_reasoning([("a", "x"), ("b", "x"), ("c", "x")])
    assert [type(r).__name__ for r in replies] == ["TeacherError", "TeacherError", "str"]
    assert all("cap" in str(r) for r in replies[:2]) and len(server.requests) == 3   # not retried


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "127.0.0.1:8000", "http://"])
def test_only_http_and_https_urls(url, tmp_path):
    with pytest.raises(ValueError, match="only http:// and https://"):
        make_teacher(f"openai:{url}#m")
    with pytest.raises(SystemExit) as e:
        cot_builder.main(["--data", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--teacher", f"openai:{url}#m"])
    assert e.value.code == 2


def incomplete(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", "500")
    handler.end_headers()
    handler.wfile.write(b'{"choices": [')          # then the connection closes


def bad_status_line(handler):
    handler.wfile.write(b"HELLO THERE\r\n\r\n")


def reset(handler):
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    handler.connection.close()


def body_with(content_json: bytes) -> bytes:
    return b'{"choices": [{"message": {"content": ' + content_json + b'}}]}'


@pytest.mark.parametrize("fault, kind", [
    (incomplete, "TransportError"),                             # IncompleteRead: retried, then a transport failure
    (bad_status_line, "TransportError"),                        # BadStatusLine
    (reset, "TransportError"),                                  # connection reset
    ((200, body_with(b'"\xff\xfe bad utf-8"')), "TeacherError"),  # invalid UTF-8: a malformed reply
    ((200, body_with(b'"\\ud800 lone surrogate"')), "TeacherError"),
    ((200, b"[" * 100000 + b"]" * 100000), "TeacherError"),     # deep nesting: RecursionError in json
])
def test_broken_replies_never_crash(server_factory, fault, kind):
    server = server_factory([fault] * 2)
    (reply,) = teacher_for(server, retries=1).from_reasoning([("a", "x")])
    assert type(reply).__name__ == kind
    assert len(server.requests) == (2 if kind == "TransportError" else 1)


def test_a_lone_surrogate_in_a_run_is_judged_malformed_and_reruns_do_not_crash(server_factory, tmp_path, toy_data):
    server = server_factory([(200, body_with(b'"<think>\\ud800</think><answer>anger</answer>"'))] * 100)
    out = tmp_path / "cot.jsonl"
    for _ in range(2):
        summary = run_with(teacher_for(server), toy_data, out)
        assert summary["images"] == 6 and summary["teachers"]["openai:teacher-7b"]["malformed"] == 6
    for r in read_jsonl(out):
        assert is_valid_text(r["think"])


def test_unreadable_images_are_skipped_listed_and_the_rest_is_done(tmp_path, toy_data, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(toy_data, root)
    records, _ = read_emoset_split(root, "train", limit=8)
    (root / records[2]["image"]).write_bytes(b"not an image at all")
    (root / records[5]["image"]).write_bytes((root / records[5]["image"]).read_bytes()[:60])   # truncated PNG
    out = tmp_path / "cot.jsonl"
    summary = build(root, out, "--limit", "8")
    assert summary["images"] == 6 and summary["not_done"]["unreadable"] == 2
    assert cot_builder.exit_code(summary) == 0
    failed = {f["id"]: f for f in read_jsonl(cot_builder.failures_path(out))}
    assert set(failed) == {records[2]["id"], records[5]["id"]}
    assert all(f["kind"] == "unreadable" for f in failed.values())
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image") == 2 and records[2]["image"] in err


def test_exit_code_is_nonzero_while_transport_failures_remain(tmp_path, toy_data):
    cmd = [sys.executable, "cot_builder.py", "--data", str(toy_data), "--out", str(tmp_path / "c.jsonl"),
           "--limit", "3", "--teacher", "toy:describer", "--teacher", f"openai:{closed_port_url()}#m",
           "--retries", "0", "--timeout", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(cot_builder.__file__).parent)
    assert done.returncode == cot_builder.EXIT_INCOMPLETE, done.stderr
    assert "ConnectionRefusedError" in done.stderr and "a rerun retries them" in done.stderr


def test_hf_teacher_answers_images_and_text_and_its_failures_are_counted(tmp_path, toy_data, tiny_model_dir):
    teacher = make_teacher(f"hf:{tiny_model_dir}")
    teacher.max_new_tokens = 12
    records, _ = read_emoset_split(toy_data, "train", limit=5)
    items = [(r["id"], data.load_image(toy_data, r)) for r in records]
    assert len(teacher.blind(items)) == 5
    assert all(isinstance(t, str) for t in teacher.from_reasoning([("k", "dark, red")]))
    teachers = [teacher, toy_teachers.ToyTeacher("describer", malformed_rate=0)]
    summary = cot_builder.build(records, toy_data, teachers, tmp_path / "c.jsonl")
    t = summary["teachers"][teacher.name]
    assert t["correct"] + t["wrong"] + t["failures"] == 5
    assert t["failures"] >= 4   # a random model rarely has the format
