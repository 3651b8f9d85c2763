"""The EmoSet-layout reader and the crash-safe JSONL helpers."""

import json

import pytest
from PIL import Image

from data import (EMOTIONS, DataError, append_jsonl, atomic_write_json, load_image, read_annotation,
                  read_emoset_split, read_jsonl, repair_jsonl_tail)


def make_emoset(root, entries, split="train"):
    """Fabricate an EmoSet folder: images for every entry path ending in .jpg, annotations too."""
    for entry in entries:
        for rel in entry[1:]:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".jpg"):
                Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
            elif rel.endswith(".json"):
                path.write_text(json.dumps({"emotion": entry[0], "brightness": 0.5}))
    (root / f"{split}.json").write_text(json.dumps(entries))


GOOD4 = ["anger", "anger_00001", "image/anger/anger_00001.jpg", "annotation/anger/anger_00001.json"]
GOOD3 = ["awe", "image/awe/awe_00002.jpg", "annotation/awe/awe_00002.json"]


def test_reads_four_and_three_element_entries(tmp_path):
    make_emoset(tmp_path, [GOOD4, GOOD3])
    records, report = read_emoset_split(tmp_path, "train")
    assert records[0] == {"id": "anger_00001", "image": GOOD4[2], "label": "anger", "annotation": GOOD4[3]}
    assert records[1] == {"id": "awe_00002", "image": GOOD3[1], "label": "awe", "annotation": GOOD3[2]}
    assert report["read"] == 2 and report["skipped_missing"] == 0
    assert load_image(tmp_path, records[0]).size == (8, 8)
    assert read_annotation(tmp_path, records[1])["emotion"] == "awe"


def test_unknown_label_names_file_and_entry(tmp_path):
    make_emoset(tmp_path, [GOOD4, ["happiness", "h1", "image/h/h1.jpg", "annotation/h/h1.json"]])
    with pytest.raises(DataError, match=r"train\.json entry 1: unknown emotion label 'happiness'"):
        read_emoset_split(tmp_path, "train")


def test_missing_image_is_an_error_or_counted_when_skipping(tmp_path):
    make_emoset(tmp_path, [GOOD4, GOOD3])
    (tmp_path / GOOD3[1]).unlink()
    with pytest.raises(DataError, match=r"entry 1: image file not found: .*awe_00002\.jpg"):
        read_emoset_split(tmp_path, "train")
    records, report = read_emoset_split(tmp_path, "train", skip_missing=True)
    assert [r["id"] for r in records] == ["anger_00001"]
    assert report["skipped_missing"] == 1 and report["skipped_ids"] == ["awe_00002"]


def test_malformed_split_json_and_entries(tmp_path):
    (tmp_path / "val.json").write_text('[["anger", "a1", ')
    with pytest.raises(DataError, match=r"val\.json: malformed JSON"):
        read_emoset_split(tmp_path, "val")
    (tmp_path / "val.json").write_text(json.dumps([["anger", 7, "x.jpg"]]))
    with pytest.raises(DataError, match=r"val\.json entry 0: expected"):
        read_emoset_split(tmp_path, "val")
    (tmp_path / "val.json").write_text(json.dumps([["anger", "a1", "notes.txt", "a.json"]]))
    with pytest.raises(DataError, match=r"entry 0: expected exactly one image path"):
        read_emoset_split(tmp_path, "val")
    with pytest.raises(DataError, match=r"test\.json: split file not found"):
        read_emoset_split(tmp_path, "test")


def test_duplicate_ids_are_an_error(tmp_path):
    make_emoset(tmp_path, [GOOD4, GOOD4])
    with pytest.raises(DataError, match="entry 1: duplicate image id 'anger_00001'"):
        read_emoset_split(tmp_path, "train")


def test_jsonl_roundtrip_and_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"id": "a", "text": "ünïcode\nnewline"})
    append_jsonl(path, {"id": "b"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    with open(path, "a") as f:
        f.write('{"id": "c", broken\n')
    with pytest.raises(DataError, match=r"r\.jsonl line 3: malformed JSON"):
        list(read_jsonl(path))


def test_repair_cuts_only_a_partial_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"id": "a"})
    assert repair_jsonl_tail(path) == 0
    with open(path, "a") as f:
        f.write('{"id": "b", "lab')  # a crash mid-write
    assert repair_jsonl_tail(path) == len('{"id": "b", "lab')
    assert [r["id"] for r in read_jsonl(path)] == ["a"]
    assert repair_jsonl_tail(tmp_path / "absent.jsonl") == 0


def test_atomic_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp files left


def test_labels_are_emoset_order():
    assert EMOTIONS == ("amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness")


def test_valence_of_each_label():
    from data import valence

    assert [valence(e) for e in EMOTIONS] == ["positive"] * 4 + ["negative"] * 4
    with pytest.raises(ValueError):
        valence("joy")


def test_epoch_sampler_covers_each_epoch_and_resumes_exactly():
    from data import EpochSampler

    a = EpochSampler(10, seed=3)
    first = a.next_batch(4) + a.next_batch(4) + a.next_batch(2)
    assert sorted(first) == list(range(10))              # one epoch = every index once
    assert first != list(range(10))                      # shuffled
    a.next_batch(3)
    state = a.state_dict()
    rest = [a.next_batch(4) for _ in range(5)]           # crosses into later epochs
    b = EpochSampler(10, seed=3)
    b.load_state_dict(state)
    assert [b.next_batch(4) for _ in range(5)] == rest
    assert EpochSampler(10, seed=4).next_batch(10) != first
    with pytest.raises(ValueError, match="cannot resume"):
        EpochSampler(9, seed=3).load_state_dict(state)


def test_truncate_log_after_step(tmp_path):
    from data import truncate_jsonl_after_step

    path = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        append_jsonl(path, {"step": step})
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')                         # a crash mid-line
    truncate_jsonl_after_step(path, 2)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    truncate_jsonl_after_step(path, 0)                    # a fresh run starts its log afresh
    assert list(read_jsonl(path)) == []
