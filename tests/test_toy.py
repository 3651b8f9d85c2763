"""The toy EmoSet: determinism, layout, and that its pixels really carry the label."""

import filecmp

import pytest

import toy
from data import load_image, read_annotation, read_emoset_split

SIZES = {"train": 12, "val": 4, "test": 4}


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    toy.write_toy_dataset(a, "demo", seed=3, sizes=SIZES)
    toy.write_toy_dataset(b, "demo", seed=3, sizes=SIZES)
    toy.write_toy_dataset(c, "demo", seed=4, sizes=SIZES)
    assert _files(a) == _files(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(p) for p in _files(a)], shallow=False)
    assert mismatch == [] and errors == []
    assert (a / "train.json").read_bytes() != (c / "train.json").read_bytes()


def test_toy_data_is_emoset_layout_and_pixels_decide_the_rule_label(toy_data):
    records, report = read_emoset_split(toy_data, "train")
    assert report["read"] == 48
    for r in records:
        ann = read_annotation(toy_data, r)
        assert ann["emotion"] == r["label"]
        seen = toy.perceive(load_image(toy_data, r))
        assert toy.TOY_TABLE[(seen["background"], seen["color"])] == ann["toy"]["rule_emotion"]
        if not ann["toy"]["label_noise"]:
            assert r["label"] == ann["toy"]["rule_emotion"]


def test_unknown_difficulty_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown difficulty 'medium'"):
        toy.write_toy_dataset(tmp_path, "medium")


def test_teacher_reasoning_round_trips_to_attributes():
    for (background, color), emotion in toy.TOY_TABLE.items():
        for style in toy.STYLES:
            think = toy.reasoning_for(style, background, color, "circle", emotion)
            assert toy.attributes_from_text(think) == (background, color)
