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
