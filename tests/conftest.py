"""Shared fixtures: a small toy dataset and the tiny VLM, built once per test session, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import toy

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_data")
    toy.write_toy_dataset(root, "demo", seed=0, sizes={"train": 48, "val": 16, "test": 16})
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_vlm") / "model"
    toy.build_tiny_vlm(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    import vlm

    return vlm.load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def half_format_model(tmp_path_factory, tiny_model_dir, toy_data):
    """A briefly SFT'd model whose completions have the right format only about half the time:
    half of its COT targets have an empty <think></think>, which the format reward scores 0."""
    import json

    import sft
    from data import read_emoset_split

    root = tmp_path_factory.mktemp("half_format")
    records, _ = read_emoset_split(toy_data, "train")
    with open(root / "cot.jsonl", "w") as f:
        for i, r in enumerate(records):
            think = "" if i % 2 else "The background is dark and the largest object is blue."
            f.write(json.dumps({**r, "think": think, "answer": r["label"]}) + "\n")
    sft.main(["--mode", "cot", "--cot", str(root / "cot.jsonl"), "--model", str(tiny_model_dir), "--data", str(toy_data),
              "--out", str(root / "run"), "--steps", "40", "--eval-every", "0", "--save-every", "40"])
    return root / "run" / "checkpoint"


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory):
    """Factory: tiny_family_dir(name) -> folder of that family's tiny checkpoint, built once per session
    (tests/tiny_families.py; the real architecture, processor, chat template and special tokens)."""
    import tiny_families

    built = {}

    def build(name: str):
        if name not in built:
            built[name] = tiny_families.build_tiny_family(name, tmp_path_factory.mktemp(f"family_{name}") / "model")
        return built[name]

    return build
