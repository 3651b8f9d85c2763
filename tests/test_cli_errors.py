"""Every command line, given one bad input, prints one `error: ...` line naming the file and the
entry or line, exits 1, and shows no traceback (unless --debug or CLGRPO_DEBUG=1 asks for it)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config import DEBUG_ENV, run_cli
from data import DataError, read_emoset_split

ROOT = Path(__file__).resolve().parents[1]


def bad_inputs(toy_data, tiny_model_dir, tmp_path) -> dict:
    """name -> (command line, what the error line must contain): one bad input per CLI."""
    records, _ = read_emoset_split(toy_data, "train", limit=4)
    cot = tmp_path / "cot.jsonl"
    lines = [{**r, "think": "The background is dark.", "answer": r["label"]} for r in records]
    lines[3]["think"] = None                                           # a broken COT record on line 4
    cot.write_text("".join(json.dumps(x) + "\n" for x in lines))
    bad_split = tmp_path / "bad_split"                                  # a split entry outside the root
    shutil.copytree(toy_data, bad_split)
    entries = json.loads((bad_split / "train.json").read_text())
    entries[2] = [entries[2][0], "x", "../../etc/x.jpg", entries[2][-1]]
    (bad_split / "train.json").write_text(json.dumps(entries))
    no_template = tmp_path / "no_template"                              # a model folder load_model refuses
    shutil.copytree(tiny_model_dir, no_template)
    for name in ("chat_template.jinja", "chat_template.json"):
        (no_template / name).unlink(missing_ok=True)
    for name in ("tokenizer_config.json", "processor_config.json"):
        config = json.loads((no_template / name).read_text())
        config.pop("chat_template", None)
        (no_template / name).write_text(json.dumps(config))
    out = str(tmp_path / "out")
    model, data = str(tiny_model_dir), str(toy_data)
    return {
        "sft": (["sft.py", "--mode", "cot", "--cot", str(cot), "--model", model, "--data", data, "--out", out],
                f"{cot} line 4: think is null"),
        "clgrpo": (["clgrpo.py", "--stage", "2", "--model", model, "--data", str(bad_split), "--out", out],
                   f"{bad_split / 'train.json'} entry 2 (image): path '../../etc/x.jpg' leaves the data root"),
        "eval": (["eval.py", "--model", str(no_template), "--data", data, "--out", out],
                 f"ValueError: {no_template}: the processor has no chat template"),
        "cot_builder": (["cot_builder.py", "--data", str(bad_split), "--split", "train", "--out", out + ".jsonl",
                         "--teacher", "toy:a"], f"{bad_split / 'train.json'} entry 2 (image)"),
        "export": (["cot_builder.py", "export", "--to", "trl", "--cot", str(cot), "--data", data, "--out", out],
                   f"{cot} line 4: think is null"),
    }


def run_all(commands: dict) -> dict:
    """Run name -> (argv, environment) concurrently (each pays the imports): name -> (return code, stderr)."""
    procs = {name: subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True) for name, (argv, env) in commands.items()}
    return {name: (p.wait(timeout=300), p.stderr.read()) for name, p in procs.items()}


@pytest.fixture(scope="module")
def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CLGRPO_DEBUG": ""}


def test_each_cli_prints_one_error_line_and_exits_1(toy_data, tiny_model_dir, tmp_path, env):
    cases = bad_inputs(toy_data, tiny_model_dir, tmp_path)
    results = run_all({name: (argv, env) for name, (argv, _) in cases.items()})
    for name, (code, stderr) in results.items():
        assert "Traceback" not in stderr, f"{name}: {stderr}"
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert code == 1 and len(errors) == 1, f"{name}: exit {code}, stderr {stderr!r}"
        assert cases[name][1] in errors[0], f"{name}: {errors[0]!r}"


@pytest.mark.parametrize("error", [DataError("train.json entry 3: bad"), ValueError("model: refused"),
                                   FileNotFoundError("no such folder")])
def test_run_cli_prints_one_line_or_the_traceback_on_request(error, capsys, monkeypatch):
    def main(argv):
        raise error

    monkeypatch.setenv(DEBUG_ENV, "")
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["--data", "x"])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(error) in lines[0]
    with pytest.raises(type(error)):       # --debug: the exception itself, so Python prints its traceback
        run_cli(main, ["--data", "x", "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(type(error)):
        run_cli(main, ["--data", "x"])


def test_other_exceptions_keep_their_traceback(monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "")

    def main(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        run_cli(main, [])
    assert run_cli(lambda argv: 7, []) == 7    # a normal return is passed through (cot_builder's exit code)
