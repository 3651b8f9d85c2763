"""The toy EmoSet: determinism, layout, and that its pixels really carry the label."""

import filecmp
import re

import pytest

import toy
import toy_teachers
from data import load_image, read_annotation, read_emoset_split
from rewards import parse_answer

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
        seen = toy_teachers.perceive(load_image(toy_data, r))
        assert toy.TOY_TABLE[(seen["background"], seen["color"])] == ann["toy"]["rule_emotion"]
        if not ann["toy"]["label_noise"]:
            assert r["label"] == ann["toy"]["rule_emotion"]


def test_unknown_difficulty_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown difficulty 'medium'"):
        toy.write_toy_dataset(tmp_path, "medium")


def test_teacher_reasoning_round_trips_to_attributes():
    for (background, color), emotion in toy.TOY_TABLE.items():
        for style in toy_teachers.STYLES:
            think = toy_teachers.reasoning_for(style, background, color, "circle", emotion)
            assert toy_teachers.attributes_from_text(think) == (background, color)


# ---------------------------------------------------------------------------------------------
# The `hard` toy: the counting rule
# ---------------------------------------------------------------------------------------------
HARD_SIZES = {"train": 40, "val": 4, "test": 4}


@pytest.fixture(scope="module")
def hard_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    toy.write_toy_dataset(root, "hard", seed=0, sizes=HARD_SIZES)
    return root


def test_counting_rule_on_hand_worked_cases():
    # red -> yellow -> green -> blue -> red: step `count` places from the largest object's colour
    assert toy.landing_color("red", 3) == "blue"
    assert toy.landing_color("blue", 1) == "red"
    assert toy.landing_color("yellow", 4) == "yellow"
    assert toy.counting_rule("dark", "red", 3) == "sadness"          # dark + blue
    assert toy.counting_rule("bright", "blue", 1) == "excitement"    # bright + red
    assert toy.counting_rule("bright", "yellow", 4) == "amusement"   # bright + yellow
    assert toy.counting_rule("dark", "green", 2) == "anger"          # dark + red


def test_counting_rule_needs_every_fact():
    # No two of (background, colour, count) decide the emotion: a one-glance reading of any
    # two facts leaves it open, which is what makes the label alone a weak teacher.
    facts = [(b, c, n) for b in ("bright", "dark") for c in toy.COLOR_WHEEL for n in range(1, 5)]
    for drop in range(3):
        seen = {}
        for f in facts:
            key = f[:drop] + f[drop + 1:]
            seen.setdefault(key, set()).add(toy.counting_rule(*f))
        assert all(len(v) > 1 for v in seen.values()), f"dropping fact {drop} still decides the emotion"


def test_hard_images_show_the_facts_that_decide_the_label(hard_data):
    records, _ = read_emoset_split(hard_data, "train")
    counts = set()
    for r in records:
        ann = read_annotation(hard_data, r)["toy"]
        seen = toy_teachers.perceive(load_image(hard_data, r))
        facts = (seen["background"], seen["largest_color"], seen["count"])
        assert facts == (ann["background"], ann["color"], ann["count"])
        assert toy.counting_rule(seen["background"], seen["largest_color"], seen["count"]) == ann["rule_emotion"]
        if not ann["label_noise"]:
            assert r["label"] == ann["rule_emotion"]
        counts.add(ann["count"])
    assert counts == {1, 2, 3, 4}


def test_hard_same_seed_same_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    toy.write_toy_dataset(a, "hard", seed=1, sizes={"train": 6, "val": 2, "test": 2})
    toy.write_toy_dataset(b, "hard", seed=1, sizes={"train": 6, "val": 2, "test": 2})
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(p) for p in _files(a)], shallow=False)
    assert _files(a) == _files(b) and mismatch == [] and errors == []


def test_counting_reasoning_states_the_facts_and_round_trips():
    for style in toy_teachers.COUNT_STYLES:
        for count in range(1, 5):
            emotion = toy.counting_rule("dark", "green", count)
            think = toy_teachers.reasoning_for(style, "dark", "green", "square", emotion, count)
            assert toy_teachers.facts_from_text(think) == ("dark", "green", count)
            assert toy.landing_color("green", count) in think.split("green", 1)[1]  # the step is stated too
            assert any(think.endswith(f"{lead} {emotion}.") for lead in ("So", "means", "suggests"))


def test_hard_teachers_read_the_pixels_with_their_own_error_rates(hard_data):
    records, _ = read_emoset_split(hard_data, "train")
    items = [(r["id"], load_image(hard_data, r)) for r in records]
    rule = [read_annotation(hard_data, r)["toy"]["rule_emotion"] for r in records]
    perfect = toy_teachers.ToyTeacher("describer:hard", error_rate=0.0, malformed_rate=0.0)
    replies = perfect.blind(items)
    assert [parse_answer(t) for t in replies] == rule
    # its own reasoning, read as text by another perfect teacher, leads to the same emotion
    thinks = [(i, t.split("<think>")[1].split("</think>")[0]) for (i, _), t in zip(items, replies)]
    checked = toy_teachers.ToyTeacher("counter:hard", error_rate=0.0).from_reasoning(thinks)
    assert [parse_answer(t) for t in checked] == rule
    noisy = toy_teachers.ToyTeacher("terse:hard", error_rate=0.5, malformed_rate=0.0).blind(items)
    wrong = sum(parse_answer(t) != y for t, y in zip(noisy, rule))
    assert 8 <= wrong <= 32  # ~half misperceive one fact; a changed fact always changes the emotion
    # the demo-rule teacher names other emotions on these images: the rule is part of the teacher
    demo_rule_teacher = toy_teachers.ToyTeacher("describer", error_rate=0.0, malformed_rate=0.0)
    assert [parse_answer(t) for t in demo_rule_teacher.blind(items)] != rule


def test_hard_hinted_reasoning_leads_to_the_given_label(hard_data):
    records, _ = read_emoset_split(hard_data, "train")
    teacher = toy_teachers.ToyTeacher("describer:hard")
    for r, reply in zip(records, teacher.hinted([(r["id"], load_image(hard_data, r), "fear") for r in records])):
        think = reply.split("<think>")[1].split("</think>")[0]
        assert toy.counting_rule(*toy_teachers.facts_from_text(think)) == "fear" == parse_answer(reply)


def test_unknown_teacher_variant_is_an_error():
    with pytest.raises(ValueError, match="expected NAME, NAME:hard, NAME:stepwise or NAME:wheel"):
        toy_teachers.ToyTeacher("describer:medium")


def test_tokenizer_is_trained_on_the_counting_phrasing():
    tok = toy.build_tiny_tokenizer()
    think = toy_teachers.reasoning_for("describer", "bright", "blue", "circle", toy.counting_rule("bright", "blue", 3),
                                       3)
    # in the corpus, so BPE merged its words: far fewer tokens than bytes (an unseen phrasing
    # of the same length, e.g. random letters, stays near one token per byte)
    assert len(tok(think)["input_ids"]) < len(think.encode()) / 3


def test_hard_facts_reads_each_fact_back_and_counts_unstated_ones_wrong():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import hard_facts

    truth = {"a": {"background": "dark", "color": "red", "count": 3, "rule_emotion": "sadness"},
             "b": {"background": "bright", "color": "blue", "count": 1, "rule_emotion": "excitement"}}
    right = toy_teachers.reasoning_for("terse", "dark", "red", "circle", "sadness", 3)
    wrong_count = toy_teachers.reasoning_for("describer", "bright", "blue", "square", "amusement", 2)
    preds = [{"id": "a", "completion": f"<think>{right}</think><answer>sadness</answer>", "pred": "sadness"},
             {"id": "b", "completion": f"<think>{wrong_count}</think><answer>amusement</answer>", "pred": "amusement"}]
    row = hard_facts.fact_row(preds, truth)
    assert row == {"background": 1.0, "colour": 1.0, "count": 0.5, "all three": 0.5, "implied answer": 0.5,
                   "answer": 0.5}
    silent = [{"id": "a", "completion": "<think>no idea</think><answer>sadness</answer>", "pred": "sadness"}]
    assert hard_facts.fact_row(silent, truth) == {"background": 0.0, "colour": 0.0, "count": 0.0, "all three": 0.0,
                                                  "implied answer": 0.0, "answer": 1.0}


# ---------------------------------------------------------------------------------------------
# The `stepwise` toy: the counting rule, its facts made one-glance features
# ---------------------------------------------------------------------------------------------
def test_stepwise_images_show_the_facts_as_glance_features(tmp_path):
    import numpy as np

    toy.write_toy_dataset(tmp_path, "stepwise", seed=0, sizes={"train": 60, "val": 2, "test": 2})
    records, _ = read_emoset_split(tmp_path, "train")
    area_by_count, counts = {}, set()
    for r in records:
        ann = read_annotation(tmp_path, r)["toy"]
        img = load_image(tmp_path, r)
        seen = toy_teachers.perceive(img)
        assert (seen["background"], seen["largest_color"], seen["count"]) == (ann["background"], ann["color"],
                                                                            ann["count"])
        assert seen["color"] == ann["color"]   # the largest shape's colour covers the most pixels
        assert toy.counting_rule(ann["background"], ann["color"], ann["count"]) == ann["rule_emotion"]
        a = np.asarray(img, dtype=np.int32)
        area_by_count.setdefault(ann["count"], []).append(int(((a.max(-1) - a.min(-1)) > 60).sum()))
        counts.add(ann["count"])
        # one shape per quadrant
        quadrants = {(c[0] >= 32, c[1] >= 32) for c in [ann["center"]] + [d["center"] for d in ann["distractors"]]}
        assert len(quadrants) == ann["count"]
    assert counts == {1, 2, 3, 4}
    # the count can be read off the coloured area: the ranges of consecutive counts do not overlap
    for n in (1, 2, 3):
        assert max(area_by_count[n]) < min(area_by_count[n + 1])


def test_model_sizes_set_the_image_tokens(tmp_path):
    small = toy.build_tiny_vlm(tmp_path / "small", seed=0, size="small")
    assert small["image_tokens"] == 64   # 64 px / patch 8 = 8 x 8 patches, no pixel shuffle
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tmp_path / "small")
    assert (cfg.scale_factor, cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers) == (1, 128, 3)


def test_stepwise_reasoning_goes_round_the_quadrants_and_names_no_landing_colour(tmp_path):
    quadrants = ["green", None, "red", None]
    for style in toy_teachers.STEPWISE_STYLES:
        emotion = toy.counting_rule("dark", "green", 2)
        think = toy_teachers.reasoning_for(style, "dark", "green", "square", emotion, 2, toy_teachers.STEPWISE_STYLES,
                                           quadrants)
        assert toy_teachers.facts_from_text(think) == ("dark", "green", 2)
        assert toy_teachers.quadrants_from_text(think) == quadrants
        # every colour it names is in the image (the landing colour, blue here, is not named)
        assert {w for w in toy_teachers._words(think) if w in toy.COLORS} == {"green", "red"}
        assert think.endswith(f" {emotion}.")
    toy.write_toy_dataset(tmp_path, "stepwise", seed=0, sizes={"train": 24, "val": 2, "test": 2})
    records, _ = read_emoset_split(tmp_path, "train")
    items = [(r["id"], load_image(tmp_path, r)) for r in records]
    truth = [read_annotation(tmp_path, r)["toy"] for r in records]
    perfect = toy_teachers.ToyTeacher("terse:stepwise", error_rate=0.0, malformed_rate=0.0)
    assert perfect.rule == "count"
    replies = perfect.blind(items)
    assert [parse_answer(t) for t in replies] == [t["rule_emotion"] for t in truth]
    for reply, t in zip(replies, truth):   # the listing is what the pixels show
        listed = toy_teachers.quadrants_from_text(reply)
        assert sum(q is not None for q in listed) == t["count"] and t["color"] in listed
    thinks = [(i, t.split("<think>")[1].split("</think>")[0]) for (i, _), t in zip(items, replies)]
    assert [parse_answer(t) for t in perfect.from_reasoning(thinks)] == [t["rule_emotion"] for t in truth]
    # a teacher that always errs misreads one fact, and its listing agrees with what it then says
    sloppy = toy_teachers.ToyTeacher("describer:stepwise", error_rate=1.0, malformed_rate=0.0)
    for reply in sloppy.blind(items):
        think = reply.split("<think>")[1].split("</think>")[0]
        background, color, count = toy_teachers.facts_from_text(think)
        listed = toy_teachers.quadrants_from_text(think)
        assert sum(q is not None for q in listed) == count and color in listed
        assert parse_answer(reply) == toy.counting_rule(background, color, count)
    hinted = perfect.hinted([(i, img, t["rule_emotion"]) for (i, img), t in zip(items, truth)])
    assert [parse_answer(t) for t in hinted] == [t["rule_emotion"] for t in truth]


def test_wheel_reasoning_writes_the_wheel_step_in_numbers(tmp_path):
    quadrants = [None, "blue", "red", "yellow"]
    emotion = toy.counting_rule("bright", "blue", 3)      # blue is 4 on the wheel; 4 + 3 comes round to 3: green
    assert emotion == toy.TOY_TABLE[("bright", "green")]
    for style in toy_teachers.WHEEL_STYLES:
        think = toy_teachers.reasoning_for(style, "bright", "blue", "circle", emotion, 3, toy_teachers.WHEEL_STYLES,
                                           quadrants)
        assert toy_teachers.facts_from_text(think) == ("bright", "blue", 3)
        assert toy_teachers.quadrants_from_text(think) == quadrants
        assert re.search(r"\b4 plus 3 (comes round to|is) 3\b", think)
        assert {w for w in toy_teachers._words(think) if w in toy.COLORS} == {"blue", "red", "yellow"}  # no "green"
        assert think.endswith(f" {emotion}.")
    toy.write_toy_dataset(tmp_path, "stepwise", seed=0, sizes={"train": 24, "val": 2, "test": 2})
    records, _ = read_emoset_split(tmp_path, "train")
    items = [(r["id"], load_image(tmp_path, r)) for r in records]
    truth = [read_annotation(tmp_path, r)["toy"] for r in records]
    replies = toy_teachers.ToyTeacher("counter:wheel", error_rate=0.0, malformed_rate=0.0).blind(items)
    assert [parse_answer(t) for t in replies] == [t["rule_emotion"] for t in truth]
    for reply in toy_teachers.ToyTeacher("terse:wheel", error_rate=1.0, malformed_rate=0.0).blind(items):
        background, color, count = toy_teachers.facts_from_text(reply)   # errs, but stays self-consistent
        place = toy.COLOR_WHEEL.index(color) + 1
        assert f"{place} plus {count} is {(place - 1 + count) % 4 + 1}" in reply
        assert parse_answer(reply) == toy.counting_rule(background, color, count)
