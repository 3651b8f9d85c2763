"""The hand-off to TRL and verl: reward adapters called exactly as TRL v1.9.0's GRPOTrainer and
verl v0.7.0's reward manager call them, and the exported rows checked against the columns and
types each library reads. Neither library (nor `datasets`) is imported."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cot_builder
import rewards
from data import EMOTIONS, INSTRUCTION, cot_target, read_emoset_split

REPO = Path(__file__).resolve().parents[1]

# (completion, label, format reward, accuracy reward), worked out from the rules in rewards.py
CASES = [
    ("<think>dark, blue</think><answer>sadness</answer>", "sadness", 1.0, 1.0),
    ("<answer>Sad.</answer>", "sadness", 0.0, 1.0),                               # the baseline's form
    ("<think>x</think><answer>maybe fear</answer>", "fear", 1.0, 0.0),             # a hedge is no label
    ("<think>x</think><answer>awe</answer> no, fear", "fear", 0.0, 0.0),           # text after the answer
]
TEXTS, LABELS, FORMATS, ACCURACIES = (list(column) for column in zip(*CASES))


def grpotrainer_call(reward_func, completions, labels):
    """As GRPOTrainer._calculate_rewards (TRL v1.9.0): every argument by keyword; each dataset
    column other than prompt/completion/completion_ids, one entry per completion; then the
    trainer state and two logging callbacks."""
    n = len(completions)
    return reward_func(prompts=[[{"role": "user", "content": INSTRUCTION}]] * n, completions=completions,
                       completion_ids=[[1, 2, 3]] * n, image=["/data/x.png"] * n, label=labels, id=["x"] * n,
                       trainer_state=object(), log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)


@pytest.mark.parametrize("wrap", [
    lambda t: t,                                                                # standard dataset
    lambda t: [{"role": "assistant", "content": t}],                            # conversational
    lambda t: [{"role": "assistant", "content": [{"type": "text", "text": t}]}],  # content as blocks
], ids=["standard", "conversational", "blocks"])
def test_trl_rewards_as_grpotrainer_calls_them(wrap):
    completions = [wrap(t) for t in TEXTS]
    assert grpotrainer_call(rewards.trl_format_reward, completions, LABELS) == FORMATS
    assert grpotrainer_call(rewards.trl_accuracy_reward, completions, LABELS) == ACCURACIES


def test_trl_completion_text_joins_messages_and_refuses_other_shapes():
    split = [{"role": "assistant", "content": "<think>x</think>"}, {"role": "assistant", "content": None},
             {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "<answer>awe</answer>"}]}]
    assert rewards.completion_text(split) == "<think>x</think><answer>awe</answer>"
    assert rewards.trl_format_reward([split]) == [1.0]
    for bad in (None, 3, ["text"], [{"role": "assistant", "content": 3}]):
        with pytest.raises(TypeError):
            rewards.completion_text(bad)
    with pytest.raises(ValueError, match="2 completions but 1 labels"):
        rewards.trl_accuracy_reward(["a", "b"], ["awe"])


def load_like_verl(name: str):
    """As verl's custom_reward_function.path/name: rewards.py executed from its file path under
    another module name, then the function looked up by name."""
    spec = importlib.util.spec_from_file_location("custom_module_clgrpo_rewards", REPO / "rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def test_verl_compute_score_as_the_reward_manager_calls_it():
    compute_score, format_score = load_like_verl("verl_compute_score"), load_like_verl("verl_format_score")
    for text, label, fmt, acc in CASES:
        # the naive reward manager: keywords, extra_info with the row's fields and verl's own additions
        call = dict(data_source="emoset", solution_str=text, ground_truth=label,
                    extra_info={"index": 0, "id": "x", "num_turns": None, "rollout_reward_scores": {}})
        assert compute_score(**call) == {"score": fmt + acc, "format": fmt, "accuracy": acc}
        assert format_score(**call) == {"score": fmt, "format": fmt, "accuracy": acc}
        # custom_reward_function.reward_kwargs are merged into the call's keywords
        assert compute_score(**{**call, "accuracy_weight": 0.0})["score"] == fmt
        assert compute_score(**{**call, "format_weight": 0.5, "accuracy_weight": 2.0})["score"] == 0.5 * fmt + 2 * acc
    with pytest.raises(ValueError, match="unknown label"):   # a ground truth that is not one of the 8 labels
        compute_score(data_source="gsm8k", solution_str="<answer>42</answer>", ground_truth="42")


# ---------------------------------------------------------------------------------------------
# The exporter
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def cot_file(tmp_path, toy_data):
    records, _ = read_emoset_split(toy_data, "train", limit=6)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({**r, "think": f"thought {i}", "answer": r["label"]}) + "\n"
                            for i, r in enumerate(records)))
    return path, records


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_one_schema(rows: list[dict]) -> None:
    """datasets' json builder infers one Arrow schema for the file: every row must have the same
    keys, nested keys and value types."""
    def shape(x):
        if isinstance(x, dict):
            return {k: shape(v) for k, v in x.items()}
        if isinstance(x, list):
            return [shape(v) for v in x[:1]]
        return type(x).__name__
    assert all(shape(row) == shape(rows[0]) for row in rows)


def test_export_to_trl_writes_grpotrainer_rows(tmp_path, toy_data, cot_file):
    cot, records = cot_file
    args = ["--to", "trl", "--cot", str(cot), "--data", str(toy_data), "--out", str(tmp_path / "trl")]
    assert cot_builder.export_main(args) == 0
    rows = read_rows(tmp_path / "trl" / "train.jsonl")
    assert len(rows) == len(records)
    assert_one_schema(rows)
    for row, record in zip(rows, records):
        assert set(row) == {"prompt", "image", "label", "id"}
        # conversational prompt with plain-text content: GRPOTrainer inserts the image placeholder itself
        assert row["prompt"] == [{"role": "user", "content": INSTRUCTION}]
        assert Path(row["image"]).is_absolute() and Path(row["image"]) == (toy_data / record["image"]).resolve()
        assert (row["label"], row["id"]) == (record["label"], record["id"]) and row["label"] in EMOTIONS
    # the label column feeds trl_accuracy_reward under its own name
    targets = [[{"role": "assistant", "content": cot_target("t", r["label"])}] for r in rows]
    assert grpotrainer_call(rewards.trl_accuracy_reward, targets, [r["label"] for r in rows]) == [1.0] * len(rows)


def test_export_to_verl_writes_rlhfdataset_rows_from_the_command_line(tmp_path, toy_data, cot_file):
    cot, records = cot_file
    out = tmp_path / "verl"
    subprocess.run([sys.executable, "cot_builder.py", "export", "--to", "verl", "--cot", str(cot),
                    "--data", str(toy_data), "--out", str(out), "--name", "emoset_train"],
                   cwd=REPO, check=True, capture_output=True)
    rows = read_rows(out / "emoset_train.json")   # verl's RLHFDataset reads *.json (JSON Lines) or *.parquet
    assert len(rows) == len(records)
    assert_one_schema(rows)
    for i, (row, record) in enumerate(zip(rows, records)):
        assert set(row) == {"data_source", "prompt", "images", "ability", "reward_model", "extra_info"}
        [message] = row["prompt"]
        assert message == {"role": "user", "content": "<image>" + INSTRUCTION}
        # verl asserts one image per <image> placeholder, in order
        assert message["content"].count("<image>") == len(row["images"]) == 1
        assert Path(row["images"][0]).is_absolute() and Path(row["images"][0]) == (toy_data / record["image"]).resolve()
        assert row["reward_model"] == {"style": "rule", "ground_truth": record["label"]}
        assert row["extra_info"] == {"index": i, "id": record["id"]}
        assert isinstance(row["data_source"], str) and isinstance(row["ability"], str)
        score = rewards.verl_compute_score(data_source=row["data_source"],
                                           solution_str=cot_target("t", record["label"]),
                                           ground_truth=row["reward_model"]["ground_truth"],
                                           extra_info=row["extra_info"])
        assert score["score"] == 2.0


def test_export_refuses_invalid_records_naming_file_and_line_or_skips_and_counts_them(tmp_path, toy_data, cot_file,
                                                                                      capsys):
    cot, records = cot_file
    lines = cot.read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "answer": "joy"})
    cot.write_text("\n".join(lines) + "\n")
    args = ["--to", "trl", "--cot", str(cot), "--data", str(toy_data), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"train\.jsonl line 3: answer 'joy' differs from label"):
        cot_builder.export_main(args)
    assert not (tmp_path / "o").exists()
    cot_builder.export_main(args + ["--skip-invalid"])
    assert len(read_rows(tmp_path / "o" / "train.jsonl")) == len(records) - 1
    assert "1 invalid records skipped" in capsys.readouterr().out
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        cot_builder.export_main(["--to", "verl", "--cot", str(cot), "--data", str(toy_data),
                                 "--out", str(tmp_path / "file")])
    assert e.value.code == 2


def test_export_of_an_emoset_split_for_validation(tmp_path, toy_data):
    cot_builder.export_main(["--to", "verl", "--split", "val", "--data", str(toy_data), "--out", str(tmp_path)])
    records, _ = read_emoset_split(toy_data, "val")
    rows = read_rows(tmp_path / "val.json")
    assert [r["reward_model"]["ground_truth"] for r in rows] == [r["label"] for r in records]
    assert [r["extra_info"]["id"] for r in rows] == [r["id"] for r in records]
