"""The EmoSet-layout reader and the crash-safe JSONL helpers."""

import json
import re
import struct
import zlib

import pytest
from PIL import Image

from data import (EMOTIONS, DataError, append_jsonl, atomic_write_json, load_image, read_annotation, read_cot_records,
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


# ---------------------------------------------------------------------------------------------
# Faults: paths outside the root, empty splits, invalid COT records, unreadable images, flags
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../outside.jpg", "image/../../outside.jpg", "/tmp/outside.jpg",
                                 "image/anger/../../../outside.jpg"])
def test_entries_that_leave_the_data_root_are_refused_and_named(tmp_path, bad):
    root = tmp_path / "root"
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.jpg")
    make_emoset(root, [GOOD4])
    (root / "train.json").write_text(json.dumps([GOOD4, ["anger", "x1", bad, "annotation/anger/anger_00001.json"]]))
    with pytest.raises(DataError, match=r"train\.json entry 1 \(image\): path .* leaves the data root"):
        read_emoset_split(root, "train")
    with pytest.raises(DataError, match=r"image of 'x1': path .* leaves the data root"):
        load_image(root, {"id": "x1", "image": bad})
    cot = root / "cot.jsonl"
    cot.write_text(json.dumps({**COT_OK, "image": bad}) + "\n")
    with pytest.raises(DataError, match=r"cot\.jsonl line 1: .*leaves the data root"):
        read_cot_records(cot, root)


def test_symlinked_folders_and_files_inside_the_root_are_followed(tmp_path):
    """The usual layout on a shared disk: the user's data root links `image/` (or single files) to
    one shared copy of the dataset somewhere else. The reader follows those links."""
    shared, root = tmp_path / "shared" / "EmoSet-118K", tmp_path / "mine"
    make_emoset(shared, [GOOD4, GOOD3])
    root.mkdir()
    (root / "image").symlink_to(shared / "image", target_is_directory=True)       # a linked folder
    (root / "annotation").mkdir()
    for rel in (GOOD4[3], GOOD3[2]):                                                # linked files
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(shared / rel)
    (root / "train.json").write_text((shared / "train.json").read_text())
    records, report = read_emoset_split(root, "train")
    assert report["read"] == 2
    assert [load_image(root, r).size for r in records] == [(8, 8), (8, 8)]
    assert read_annotation(root, records[0])["emotion"] == "anger"
    cot = root / "cot.jsonl"
    cot.write_text(json.dumps(COT_OK) + "\n")
    assert read_cot_records(cot, root)[0][0]["image"] == GOOD4[2]
    (shared / GOOD3[1]).write_bytes(b"not an image")   # a followed link still has to decode as an image
    with pytest.raises(DataError, match=r"cannot read image of 'awe_00002'"):
        load_image(root, records[1])


def test_a_symlink_inside_the_root_is_fine(tmp_path):
    make_emoset(tmp_path, [GOOD4])
    (tmp_path / "image" / "alias").symlink_to(tmp_path / "image" / "anger")
    (tmp_path / "train.json").write_text(json.dumps([["anger", "a", "image/alias/anger_00001.jpg", GOOD4[3]]]))
    records, _ = read_emoset_split(tmp_path, "train")
    assert load_image(tmp_path, records[0]).size == (8, 8)


def test_an_empty_split_is_a_clear_error_and_training_skips_evaluation(tmp_path, capsys):
    from data import read_val_for_training

    make_emoset(tmp_path, [], split="val")
    with pytest.raises(DataError, match=r"val\.json: the val split has no usable entries"):
        read_emoset_split(tmp_path, "val")
    assert read_emoset_split(tmp_path, "val", allow_empty=True)[0] == []
    assert read_val_for_training(tmp_path, eval_every=10, limit=5) == []
    assert "evaluation during training is skipped" in capsys.readouterr().err
    assert read_val_for_training(tmp_path / "absent", eval_every=0, limit=5) == []   # off: not even read


COT_OK = {"id": "anger_00001", "image": GOOD4[2], "label": "anger", "think": "red on dark", "answer": "anger"}


@pytest.mark.parametrize("change, message", [
    ({"think": None}, "think is null, expected a string"),
    ({"think": "dark <think> red"}, "think contains '<think>'"),
    ({"think": "dark </answer>"}, "think contains '</answer>'"),
    ({"think": "look at <image> here"}, "think contains '<image>'"),     # a special token (passed as forbidden)
    ({"think": "x" * 200_000}, "think is 200000 characters, over the cap of 4096"),
    ({"answer": "fear"}, "answer 'fear' differs from label 'anger'"),
    ({"label": "joy", "answer": "joy"}, "unknown label 'joy'"),
    ({"image": "../x.jpg"}, "image: path '../x.jpg' leaves the data root"),
    ({"image": "image/anger/missing.jpg"}, "image file not found"),
    ({"think": "\ud800"}, "think is not valid UTF-8"),
    ({"answer": None, "think": 3}, "think is int"),
])
def test_cot_records_are_validated_with_file_and_line(tmp_path, change, message):
    from data import read_cot_records

    make_emoset(tmp_path, [GOOD4, GOOD3])
    path = tmp_path / "cot.jsonl"
    good2 = {**COT_OK, "id": "awe_00002", "image": GOOD3[1], "label": "awe", "answer": "awe"}
    lines = [COT_OK, good2, {**COT_OK, "id": "bad", **change}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError, match=r"cot\.jsonl line 3: " + re.escape(message)):
        read_cot_records(path, tmp_path, forbidden=("<image>",))
    records, report = read_cot_records(path, tmp_path, forbidden=("<image>",), skip_invalid=True)
    assert [r["id"] for r in records] == ["anger_00001", "awe_00002"] and report["skipped_invalid"] == 1


def test_duplicate_cot_ids_name_both_lines(tmp_path):
    from data import read_cot_records

    make_emoset(tmp_path, [GOOD4])
    path = tmp_path / "cot.jsonl"
    path.write_text((json.dumps(COT_OK) + "\n") * 2)
    with pytest.raises(DataError, match=r"line 2: duplicate id 'anger_00001' \(first at line 1\)"):
        read_cot_records(path, tmp_path)


def huge_png_header(width: int, height: int) -> bytes:
    """A ~60-byte PNG claiming width x height pixels: its header, then an empty IDAT and IEND."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "not_an_image", "bomb", "just_over_the_limit", "empty"])
def test_unreadable_images_raise_a_named_error_and_are_skipped_with_one_warning(tmp_path, capsys, kind):
    from data import load_images

    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    content = {"truncated": png[:len(png) // 2], "corrupt": png[:40] + bytes(len(png) - 40),
               "not_an_image": b"hello, I am text", "bomb": huge_png_header(100_000, 100_000),
               "just_over_the_limit": huge_png_header(10_000, 9_000), "empty": b""}[kind]
    (tmp_path / "bad.png").write_bytes(content)
    bad = {"id": "b", "image": "bad.png"}
    with pytest.raises(DataError, match=r"bad\.png: cannot read image of 'b'") as e:
        load_image(tmp_path, bad)
    if kind in ("bomb", "just_over_the_limit"):
        assert "DecompressionBombError" in str(e.value)
    skipped = {}
    for _ in range(2):   # the same bad image twice: skipped twice, warned about once
        kept, images = load_images(tmp_path, [{"id": "g", "image": "good.png"}, bad], skipped)
        assert [r["id"] for r in kept] == ["g"] and images[0].size == (64, 64)
    assert list(skipped) == ["b"]
    assert capsys.readouterr().err.count("skipping unreadable image") == 1


def test_numeric_flag_types_refuse_bad_values():
    import argparse

    from config import float_in, int_at_least, output_path_problem

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int_at_least(1))
    p.add_argument("--top-p", type=float_in(0, 1, lo_open=True))
    assert p.parse_args(["--steps", "3", "--top-p", "1"]).steps == 3
    for bad in (["--steps", "0"], ["--steps", "x"], ["--top-p", "0"], ["--top-p", "nan"], ["--top-p", "1.5"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="must be an integer >= 1, got 0"):
        int_at_least(1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be a finite number in \(0, 1\], got inf"):
        float_in(0, 1, lo_open=True)("inf")
    assert output_path_problem(__file__, "dir").endswith("exists and is not a folder")
    assert "is a folder" in output_path_problem("/tmp", "file")
    assert "is not a folder" in output_path_problem(__file__ + "/sub/out", "dir")
    assert output_path_problem("/tmp/some/new/run", "dir") is None
