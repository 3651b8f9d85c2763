"""Failure semantics of the training scripts, and kill -9 at random points (cot_builder and SFT):
a resumed run must equal an uninterrupted one, with no record lost and none duplicated."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import checkpoints
import clgrpo
import cot_builder
import eval as evaluation
import families
import pytest
import sft
import torch
import toy
from data import read_emoset_split, read_jsonl
from test_data import huge_png_header

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Flags and paths are refused before anything is loaded
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(families, "load_model", refuse)


SFT = ["--mode", "label", "--model", "m", "--data", "d"]
RL = ["--stage", "3", "--model", "m", "--data", "d"]


@pytest.mark.parametrize("main, base, bad", [
    (sft.main, SFT, ["--steps", "0"]), (sft.main, SFT, ["--batch-size", "0"]), (sft.main, SFT, ["--grad-accum", "0"]),
    (sft.main, SFT, ["--save-every", "0"]), (sft.main, SFT, ["--limit", "0"]), (sft.main, SFT, ["--lr", "nan"]),
    (clgrpo.main, RL, ["--mu", "0"]), (clgrpo.main, RL, ["--steps", "0"]), (clgrpo.main, RL, ["--batch-size", "0"]),
    (clgrpo.main, RL, ["--save-every", "0"]), (clgrpo.main, RL, ["--num-generations", "1"]),
    (clgrpo.main, RL, ["--temperature", "0"]), (clgrpo.main, RL, ["--eps-low", "1"]),
    (clgrpo.main, RL, ["--beta", "-1"]),
    (evaluation.main, ["--model", "m", "--data", "d"], ["--limit", "0"]),
    (evaluation.main, ["--model", "m", "--data", "d"], ["--batch-size", "0"]),
    (cot_builder.main, ["--data", "d", "--teacher", "toy:terse"], ["--workers", "0"]),
    (cot_builder.main, ["--data", "d", "--teacher", "toy:terse"], ["--timeout", "0"]),
    (cot_builder.main, ["--data", "d", "--teacher", "toy:terse"], ["--limit", "0"]),
])
def test_bad_numbers_are_refused_before_loading(tmp_path, no_loading, capsys, main, base, bad):
    out = ["--out", str(tmp_path / ("o.jsonl" if main is cot_builder.main else "run"))]
    with pytest.raises(SystemExit) as e:
        main(base + out + bad)
    assert e.value.code == 2 and f"argument {bad[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("main, base", [(sft.main, SFT), (clgrpo.main, RL),
                                        (evaluation.main, ["--model", "m", "--data", "d"])])
def test_out_pointing_at_a_file_is_refused_before_loading(tmp_path, no_loading, capsys, main, base):
    (tmp_path / "file").write_text("precious")
    with pytest.raises(SystemExit) as e:
        main(base + ["--out", str(tmp_path / "file")])
    assert e.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "precious"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("main, base", [(sft.main, SFT), (clgrpo.main, RL)])
def test_resume_without_trainer_state_is_an_error_that_changes_nothing(tmp_path, no_loading, main, base):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "config.json").write_text("{}")          # weights but no trainer state
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = snapshot(out)
    with pytest.raises(SystemExit, match="--resume: .*trainer_state.pt not found.*nothing was changed"):
        main(base + ["--out", str(out), "--resume"])
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------
# Checkpoints: a kill between the two renames, non-finite weights
# ---------------------------------------------------------------------------------------------
def test_a_kill_between_the_renames_is_recovered_at_the_next_start(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    ckpt = tmp_path / "run" / "checkpoint"
    checkpoints.save_checkpoint(model, processor, ckpt, trainer_state={"step": 1})
    real_replace, calls = os.replace, []

    def killed_after_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("SIGKILL")   # out -> .old happened, .tmp -> out did not
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(model, processor, ckpt, trainer_state={"step": 2})
    monkeypatch.undo()
    assert not ckpt.exists() and sorted(p.name for p in ckpt.parent.iterdir()) == [".checkpoint.old", ".checkpoint.tmp"]
    assert checkpoints.resume_point(tmp_path / "run", resume=True) == ckpt       # recovered, then resumable
    assert torch.load(ckpt / "trainer_state.pt")["step"] == 1
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint"]


def test_non_finite_weights_are_never_saved(tiny, tmp_path):
    model, processor = tiny
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(iter(bad))
    bad[name][0] = float("inf")
    broken = type(model)(model.config)
    broken.load_state_dict(bad)
    with pytest.raises(checkpoints.NonFiniteError, match=f"non-finite weights \\(first: {name}\\)"):
        checkpoints.save_checkpoint(broken, processor, tmp_path / "ckpt")
    assert not list(tmp_path.iterdir())
    checkpoints.require_finite_weights(model)   # the healthy model passes


def poison_after(monkeypatch, n_steps: int):
    """AdamW whose n-th step writes inf into one weight (what a diverging update does)."""
    real, count = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == n_steps:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].view(-1)[0] = float("inf")
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_sft_stops_on_non_finite_weights_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, toy_data,
                                                                           monkeypatch):
    common = ["--mode", "label", "--model", str(tiny_model_dir), "--data", str(toy_data),
              "--out", str(tmp_path / "run"), "--steps", "4", "--batch-size", "4", "--save-every", "1",
              "--eval-every", "0"]
    poison_after(monkeypatch, 3)
    with pytest.raises(SystemExit, match="stopped at step 3: non-finite weights .* after the optimizer step"):
        sft.main(common)
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    model, _ = families.load_model(tmp_path / "run")
    checkpoints.require_finite_weights(model)


def test_clgrpo_stops_on_non_finite_weights(tmp_path, tiny_model_dir, toy_data, monkeypatch):
    out = tmp_path / "run"
    real, calls = clgrpo.grpo_step, []

    def diverging_step(policy, *args, **kwargs):   # step 2's update overflows a weight
        result = real(policy, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(policy.model.parameters()).view(-1)[0] = float("inf")
        return result
    monkeypatch.setattr(clgrpo, "grpo_step", diverging_step)
    with pytest.raises(SystemExit, match="stopped at step 2: non-finite weights .* last good checkpoint"):
        clgrpo.main(["--stage", "3", "--model", str(tiny_model_dir), "--data", str(toy_data), "--out", str(out),
                     "--steps", "3", "--beta", "0", "--batch-size", "2", "--num-generations", "2",
                     "--max-new-tokens", "4", "--eval-every", "0", "--save-every", "1"])
    assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 1
    checkpoints.require_finite_weights(families.load_model(out)[0])


# ---------------------------------------------------------------------------------------------
# Unreadable images: skipped, counted, one warning each, the run goes on (sft, clgrpo, eval)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def damaged_data(tmp_path_factory, toy_data):
    root = tmp_path_factory.mktemp("damaged") / "data"
    shutil.copytree(toy_data, root)
    train, _ = read_emoset_split(root, "train")
    val, _ = read_emoset_split(root, "val")
    (root / train[0]["image"]).write_bytes(b"not an image")
    png = (root / train[1]["image"]).read_bytes()
    (root / train[1]["image"]).write_bytes(png[:len(png) // 2])                        # truncated
    (root / val[0]["image"]).write_bytes(huge_png_header(100_000, 100_000))             # a decompression bomb
    return root, [train[0]["id"], train[1]["id"]], val[0]["id"]


def test_unreadable_images_are_skipped_in_sft_and_its_evaluation(tmp_path, tiny_model_dir, damaged_data, capsys):
    root, bad_train, bad_val = damaged_data
    result = sft.main(["--mode", "label", "--model", str(tiny_model_dir), "--data", str(root),
                       "--out", str(tmp_path / "r"), "--steps", "14", "--batch-size", "8",
                       "--eval-every", "14", "--eval-limit", "4", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert result["step"] == 14 and result["unreadable_images"] == 3      # 14 x 8 > 2 epochs: each seen twice
    for image_id in bad_train + [bad_val]:
        assert err.count(f"image of {image_id!r}") == 1, image_id
    assert "DecompressionBombError" in err


def test_unreadable_images_are_skipped_in_clgrpo_and_eval(tmp_path, tiny_model_dir, damaged_data, capsys):
    root, bad_train, bad_val = damaged_data
    result = clgrpo.main(["--stage", "3", "--model", str(tiny_model_dir), "--data", str(root),
                          "--out", str(tmp_path / "r"), "--steps", "13", "--batch-size", "8",
                          "--num-generations", "2", "--max-new-tokens", "4",
                          "--beta", "0", "--eval-every", "0", "--save-every", "100"])
    assert result["step"] == 13 and result["unreadable_images"] == 2
    evaluation.main(["--model", str(tiny_model_dir), "--data", str(root), "--split", "val",
                     "--out", str(tmp_path / "e"), "--max-new-tokens", "4"])
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert results["skipped_unreadable"] == [bad_val] and results["n"] == 15
    assert capsys.readouterr().err.count(f"image of {bad_val!r}") == 1


def test_training_with_an_empty_val_split_skips_evaluation_with_a_warning(tmp_path, tiny_model_dir, capsys):
    root = tmp_path / "data"
    toy.write_toy_dataset(root, "easy", seed=1, sizes={"train": 8, "val": 0, "test": 0})
    sft.main(["--mode", "label", "--model", str(tiny_model_dir), "--data", str(root), "--out", str(tmp_path / "r"),
              "--steps", "2", "--batch-size", "4", "--eval-every", "1"])
    assert "evaluation during training is skipped" in capsys.readouterr().err
    assert all("val_accuracy" not in r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl"))


# ---------------------------------------------------------------------------------------------
# kill -9 at random points, then resume: the result equals an uninterrupted run
# ---------------------------------------------------------------------------------------------
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def run_killed(cmd, watch: Path, kill_at_line: int, rng: random.Random) -> bool:
    """Start cmd, wait until `watch` has `kill_at_line` lines, then SIGKILL it a random moment
    later. Returns True when the kill landed while it was running."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and count_lines(watch) < kill_at_line and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.08))
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


def test_cot_builder_killed_at_random_points_loses_and_duplicates_nothing(tmp_path, toy_data):
    rng = random.Random(13)
    base = [sys.executable, "cot_builder.py", "--data", str(toy_data), "--chunk", "2",
            "--teacher", "toy:describer", "--teacher", "toy:counter", "--teacher", "toy:terse"]
    subprocess.run(base + ["--out", str(tmp_path / "ref.jsonl")], cwd=REPO, env=ENV, check=True, capture_output=True)
    out = tmp_path / "killed.jsonl"
    kills = sum(run_killed(base + ["--out", str(out)], cot_builder.progress_path(out), k, rng)
                for k in sorted(rng.sample(range(1, 46), 4)))
    assert kills >= 3
    subprocess.run(base + ["--out", str(out)], cwd=REPO, env=ENV, check=True, capture_output=True)
    got, ref = list(read_jsonl(out)), list(read_jsonl(tmp_path / "ref.jsonl"))
    assert len({r["id"] for r in got}) == len(got)                              # none duplicated
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, ref))           # none lost, none changed
    progress = [r["id"] for r in read_jsonl(cot_builder.progress_path(out))]
    assert sorted(progress) == sorted(r["id"] for r in read_emoset_split(toy_data, "train")[0])


def test_sft_killed_at_random_points_resumes_to_the_same_weights_and_log(tmp_path, tiny_model_dir, toy_data,
                                                                        one_thread):  # as OMP_NUM_THREADS=1 below
    rng = random.Random(7)

    def cmd(out, resume=False):
        return [sys.executable, "sft.py", "--mode", "label", "--model", str(tiny_model_dir), "--data", str(toy_data),
                "--out", str(out), "--steps", "8", "--batch-size", "4", "--warmup", "2", "--save-every", "1",
                "--eval-every", "0"] + (["--resume"] if resume else [])

    sft.main(cmd(tmp_path / "ref")[2:])            # the uninterrupted reference, in this process (saves a start-up)
    out = tmp_path / "killed"
    has_state = lambda: any((out / d / "trainer_state.pt").is_file() for d in ("checkpoint", ".checkpoint.old"))  # noqa: E731
    kills = 0
    for k in sorted(rng.sample(range(1, 7), 2)):
        kills += run_killed(cmd(out, resume=has_state()), out / "metrics.jsonl", k, rng)
    assert kills >= 1
    subprocess.run(cmd(out, resume=has_state()), cwd=REPO, env=ENV, check=True, capture_output=True)
    ref, got = families.load_model(tmp_path / "ref")[0].state_dict(), families.load_model(out)[0].state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)                         # bit-exact
    strip = lambda path: [{k: v for k, v in r.items() if k != "step_s"} for r in read_jsonl(path)]  # noqa: E731
    assert strip(out / "metrics.jsonl") == strip(tmp_path / "ref" / "metrics.jsonl")
