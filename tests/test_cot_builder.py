"""cot_builder.py: the four steps with toy teachers, the OpenAI-compatible client against a local
fake server, and kill-and-resume."""

import base64
import io
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import cot_builder
import data
import toy
from data import read_emoset_split, read_jsonl

TEACHERS = ["toy:describer", "toy:counter", "toy:terse"]


def build(toy_data, out, *extra):
    return cot_builder.main(["--data", str(toy_data), "--out", str(out), *sum([["--teacher", t] for t in TEACHERS], []), *extra])


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
    """127.0.0.1, random port. `script` is a list of (status, body) served in order, then 200s."""

    def __init__(self, script=(), reply="<think>dark and red</think><answer>anger</answer>"):
        self.script, self.requests, self.reply = list(script), [], reply
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                status, payload = server.script.pop(0) if server.script else (200, None)
                if payload is None:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": server.reply}}]})
                data_ = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data_)))
                self.end_headers()
                self.wfile.write(data_)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
    return cot_builder.OpenAITeacher(server.url, "teacher-7b", **kwargs)


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
    with pytest.raises(cot_builder.TeacherError, match="gave up after 3 attempts: HTTP 503"):
        teacher.chat("hi")
    assert len(server.requests) == 3


def test_400_is_reported_clearly_without_retry(server_factory):
    server = server_factory([(400, '{"error": "image too large"}')])
    teacher = teacher_for(server)
    with pytest.raises(cot_builder.TeacherError, match=r"HTTP 400 .*not retried.*image too large"):
        teacher.chat("hi")
    assert len(server.requests) == 1


def test_malformed_bodies_and_failures_are_counted_not_raised(server_factory, tmp_path, toy_data):
    server = server_factory([(200, "not json"), (200, '{"choices": []}'), (400, "{}")])
    teacher = teacher_for(server, workers=1)
    replies = teacher.blind([(str(i), Image.new("RGB", (8, 8))) for i in range(4)])
    assert [type(r).__name__ for r in replies[:3]] == ["TeacherError"] * 3
    assert replies[3] == server.reply and teacher.calls["failures"] == 3
    # In a run: failures are counted per teacher, nothing crashes, no bad record is written.
    server2 = server_factory([(200, "garbage")] * 3, reply="no tags here")
    http_teacher = teacher_for(server2, workers=2)
    records, _ = read_emoset_split(toy_data, "train", limit=6)
    out = tmp_path / "cot.jsonl"
    summary = cot_builder.build(records, toy_data, [http_teacher, toy.ToyTeacher("describer", malformed_rate=0)], out)
    t = summary["teachers"][http_teacher.name]
    assert t["errors"] == 3 and t["malformed"] == 3 and t["correct"] == 0
    assert all(r["teacher"] == "toy:describer" for r in read_jsonl(out))


def test_hf_teacher_answers_images_and_text_and_its_failures_are_counted(tmp_path, toy_data, tiny_model_dir):
    teacher = cot_builder.make_teacher(f"hf:{tiny_model_dir}")
    teacher.max_new_tokens = 12
    records, _ = read_emoset_split(toy_data, "train", limit=5)
    items = [(r["id"], data.load_image(toy_data, r)) for r in records]
    assert len(teacher.blind(items)) == 5 and all(isinstance(t, str) for t in teacher.from_reasoning([("k", "dark, red")]))
    summary = cot_builder.build(records, toy_data, [teacher, toy.ToyTeacher("describer", malformed_rate=0)], tmp_path / "c.jsonl")
    t = summary["teachers"][teacher.name]
    assert t["correct"] + t["wrong"] + t["failures"] == 5 and t["failures"] >= 4   # a random model rarely has the format
