"""Shared fixtures: a small toy dataset and the tiny VLM, built once per test session, offline."""

import contextlib
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch

import toy

SESSION_THREADS = max(1, min(2, os.cpu_count() or 1))   # the 2-core CI machine's budget


@contextlib.contextmanager
def preserved_global_state():
    """Restore, on exit, the process-wide state that tests and the entry points they call change:
    torch's thread count and the random generators of torch (CPU), Python and NumPy (sft.main and
    clgrpo.main seed all three). Without it a test's outcome could depend on the tests before it."""
    threads, py_state, np_state = torch.get_num_threads(), random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def session_threads():
    """Every test starts with SESSION_THREADS torch threads; the caller's count comes back at the end."""
    before = torch.get_num_threads()
    torch.set_num_threads(SESSION_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def isolated_global_state():
    with preserved_global_state():
        yield


@pytest.fixture
def one_thread():
    """One torch thread for this test (bit-exact comparisons with runs in OMP_NUM_THREADS=1
    subprocesses, or between two runs in this process); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    import families

    return families.load_model(tiny_model_dir)


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
    sft.main(["--mode", "cot", "--cot", str(root / "cot.jsonl"), "--model", str(tiny_model_dir),
              "--data", str(toy_data), "--out", str(root / "run"),
              "--steps", "40", "--eval-every", "0", "--save-every", "40"])
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
