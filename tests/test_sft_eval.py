"""sft.py (label masks, learning, resume) and eval.py (pure metrics, the confusion picture)."""

import json
import types

import pytest
import torch
from PIL import Image

import charts
import eval as evaluation
import families
import sft
import toy
import toy_teachers
import vlm
from data import EMOTIONS, load_image, read_annotation, read_emoset_split


# ---------------------------------------------------------------------------------------------
# Label masks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("targets", [
    ["<answer>awe</answer>", "<answer>contentment</answer>", "<answer>fear</answer>"],
    ["<think>The background is dark and the largest object is a blue circle.</think><answer>sadness</answer>",
     "<think>short</think><answer>awe</answer>", "<think>x</think><answer>anger</answer>"],
])
def test_sft_labels_cover_exactly_the_assistant_tokens(tiny, toy_data, padding_side, targets):
    _, processor = tiny
    tok = processor.tokenizer
    records, _ = read_emoset_split(toy_data, "train", limit=3)
    batch = sft.build_sft_batch(processor, [load_image(toy_data, r) for r in records], targets, padding_side)
    eos = tok.eos_token_id
    for i, target in enumerate(targets):
        ids, labels, attn = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        expected = tok(target, add_special_tokens=False)["input_ids"] + [eos]
        kept = labels[labels != sft.IGNORE].tolist()
        assert kept == expected                                      # the target and its end-of-turn token
        assert tok.decode(kept, skip_special_tokens=True) == target
        assert (labels[attn == 0] == sft.IGNORE).all()               # padding
        assert (labels[ids == processor.image_token_id] == sft.IGNORE).all()  # image tokens
        lab_pos = (labels != sft.IGNORE).nonzero().squeeze(1)
        assert torch.equal(ids[lab_pos], labels[lab_pos])            # labels are the tokens themselves
        assert lab_pos.tolist() == list(range(lab_pos[0], lab_pos[0] + len(expected)))  # one contiguous span
        prompt_part = ids[attn.bool()][: -len(expected)]
        assert tok.decode(prompt_part).endswith("Assistant:")        # everything before it is the prompt
        if padding_side == "left":
            assert lab_pos[-1] == len(ids) - 1
        else:
            assert attn[lab_pos[-1] + 1:].sum() == 0


def test_sft_loss_is_target_cross_entropy(tiny, toy_data):
    model, processor = tiny
    records, _ = read_emoset_split(toy_data, "train", limit=2)
    images = [load_image(toy_data, r) for r in records]
    batch = sft.build_sft_batch(processor, images, ["<answer>awe</answer>", "<answer>fear</answer>"])
    with torch.no_grad():
        loss = sft.sft_loss(model, batch)
        # reference: full logits, shift by one, mean CE over labelled positions
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        inputs["position_ids"] = vlm.position_ids_from_mask(inputs["attention_mask"])
        logits = model(**inputs).logits[:, :-1]
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_warmup_cosine_schedule():
    assert sft.warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert sft.warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert sft.warmup_cosine(60, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert sft.warmup_cosine(110, 10, 110) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Learning and resuming
# ---------------------------------------------------------------------------------------------
def test_limit_takes_the_first_n_examples_in_both_modes(tiny, toy_data, tmp_path):
    records, _ = read_emoset_split(toy_data, "train")
    cot = tmp_path / "cot.jsonl"
    cot.write_text("".join(json.dumps({**r, "think": "dark", "answer": r["label"]}) + "\n" for r in records))
    for mode in ("cot", "label"):
        args = sft.parse_args(["--mode", mode, "--cot", str(cot), "--model", "m", "--data", str(toy_data),
                               "--out", str(tmp_path / mode), "--limit", "5"])
        examples = sft.load_examples(args, tiny[1])
        assert [e["id"] for e in examples] == [r["id"] for r in records[:5]], mode


def test_label_sft_learns_the_easy_toy(tmp_path, tiny_model_dir):
    data = tmp_path / "easy"
    toy.write_toy_dataset(data, "easy", seed=1, sizes={"train": 256, "val": 16, "test": 48})
    test, _ = read_emoset_split(data, "test")
    model, processor = families.load_model(tiny_model_dir)
    before, _ = evaluation.evaluate(model, processor, data, test, progress=False)
    sft.main(["--mode", "label", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "run"),
              "--steps", "60", "--eval-every", "0", "--save-every", "60"])
    model, processor = families.load_model(tmp_path / "run")
    after, _ = evaluation.evaluate(model, processor, data, test, progress=False)
    assert before["accuracy"] < 0.3          # chance is 1/8; the random model rarely even answers
    assert after["accuracy"] >= 0.9
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 61)) and lines[-1]["loss"] < lines[0]["loss"]


def test_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, toy_data, one_thread):
    cot = tmp_path / "cot.jsonl"
    records, _ = read_emoset_split(toy_data, "train")
    with open(cot, "w") as f:
        for r in records:
            f.write(json.dumps({**r, "think": "The background is bright.", "answer": r["label"]}) + "\n")
    common = ["--mode", "cot", "--cot", str(cot), "--model", str(tiny_model_dir), "--data", str(toy_data),
              "--steps", "6", "--batch-size", "4", "--grad-accum", "2", "--warmup", "2", "--eval-every", "0",
              "--save-every", "100"]
    sft.main(common + ["--out", str(tmp_path / "full")])
    sft.main(common + ["--out", str(tmp_path / "split"), "--stop-after", "3"])
    state = torch.load(tmp_path / "split" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3
    sft.main(common + ["--out", str(tmp_path / "split"), "--resume"])
    full, _ = families.load_model(tmp_path / "full")
    split, _ = families.load_model(tmp_path / "split")
    for (name, a), b in zip(full.state_dict().items(), split.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# Metrics on crafted predictions
# ---------------------------------------------------------------------------------------------
def test_metrics_by_hand():
    labels = ["anger", "anger", "anger", "awe", "awe", "fear"]
    preds = ["anger", "anger", "fear", "awe", None, "sadness"]
    m = evaluation.classification_metrics(preds, labels, formats=[1, 1, 0, 1, 0, 1])
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["per_class_recall"]["anger"] == pytest.approx(2 / 3)
    assert m["per_class_recall"]["awe"] == pytest.approx(1 / 2)
    assert m["per_class_recall"]["fear"] == 0.0
    assert m["per_class_recall"]["amusement"] is None              # absent class: no NaN
    assert m["uar"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)       # over the 3 present classes
    # F1: anger P=2/2 R=2/3 -> 0.8; awe P=1 R=1/2 -> 2/3; fear P=0/1 R=0 -> 0
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    # valence: anger->anger ok, anger->anger ok, anger->fear ok (both negative), awe ok, None wrong, fear->sadness ok
    assert m["valence_accuracy"] == pytest.approx(5 / 6)
    assert m["format_rate"] == pytest.approx(4 / 6)
    assert m["invalid_rate"] == pytest.approx(1 / 6)
    cm = m["confusion"]
    assert cm[EMOTIONS.index("anger")][EMOTIONS.index("fear")] == 1
    assert cm[EMOTIONS.index("awe")][8] == 1                          # the 'invalid' column
    assert sum(map(sum, cm)) == 6


def test_metrics_errors_and_prediction_parsing():
    with pytest.raises(ValueError):
        evaluation.classification_metrics(["awe"], ["awe", "fear"])
    with pytest.raises(ValueError, match="1 formats for 2 labels"):
        evaluation.classification_metrics(["awe", "awe"], ["awe", "fear"], formats=[1.0])
    with pytest.raises(ValueError, match="3 answers for 2 labels"):
        evaluation.classification_metrics(["awe", "awe"], ["awe", "fear"], answers=["a", "b", "c"])
    p = evaluation.prediction_of("<think>dark, blue</think><answer>Sad</answer>")
    assert p == {"answer": "Sad", "pred": "sadness", "format": 1.0}


@pytest.mark.parametrize("completion, answer, pred, fmt", [
    ("<think>dark</think><answer>not sadness</answer>", "not sadness", None, 1.0),   # an answer, not a label
    ("<think>dark</think><answer>sadness?</answer>", "sadness?", None, 1.0),
    ("<think>dark</think><answer>I feel sad</answer>", "I feel sad", None, 1.0),
    ("<think>dark</think><answer>sad</answer> or fear", None, None, 0.0),            # no final answer block
    ("<think>dark</think>sadness", None, None, 0.0),
    ("<answer>sadness</answer>", "sadness", "sadness", 0.0),                        # the baseline's form
    ("<think>\u200b</think><answer>Sadness.</answer>", "Sadness.", "sadness", 0.0),  # invisible reasoning
])
def test_prediction_of_uses_the_reward_parser(completion, answer, pred, fmt):
    assert evaluation.prediction_of(completion) == {"answer": answer, "pred": pred, "format": fmt}


def test_invalid_and_unparseable_rates_from_completions():
    """Six completions for the label fear: one right, one wrong label, two with an answer block
    that is not one label word, two with no final answer block at all."""
    completions = ["<think>x</think><answer>fear</answer>", "<think>x</think><answer>awe</answer>",
                   "<think>x</think><answer>maybe fear</answer>", "<think>x</think><answer>fear!!</answer>",
                   "<think>x</think><answer>fear</answer> no, awe", "fear"]
    ps = [evaluation.prediction_of(c) for c in completions]
    m = evaluation.classification_metrics([p["pred"] for p in ps], ["fear"] * 6, [p["format"] for p in ps],
                                          [p["answer"] for p in ps])
    assert m["accuracy"] == pytest.approx(1 / 6)
    assert m["invalid_rate"] == pytest.approx(4 / 6)
    assert m["unparseable_rate"] == pytest.approx(2 / 6)
    assert m["format_rate"] == pytest.approx(4 / 6)
    assert m["confusion"][EMOTIONS.index("fear")] == [0, 1, 0, 0, 0, 0, 1, 0, 4]
    assert evaluation.classification_metrics(["fear"], ["fear"])["unparseable_rate"] is None


def test_confusion_png_has_one_cell_per_class_pair(tmp_path):
    matrix = [[0] * 9 for _ in EMOTIONS]
    for i in range(8):
        matrix[i][i] = 10
        matrix[i][8] = 0
    matrix[0][8] = 10  # half of row 0 is invalid
    charts.confusion_png(matrix, tmp_path / "cm.png", "t")
    img = Image.open(tmp_path / "cm.png").convert("RGB")
    c, m = charts.CELL, charts.MARGIN
    assert img.size == (m + 9 * c + 10, m + 8 * c + 10)
    corner = lambda i, j: img.getpixel((m + j * c + 2, m + i * c + 2))  # noqa: E731 (a cell's shade, away from its text)
    assert corner(1, 1)[0] == 0                # full row on the diagonal: darkest
    assert corner(1, 2)[0] == 255              # empty cell: white
    assert corner(0, 0)[0] == corner(0, 8)[0] == 127  # 10 of 20: half shade


def test_plot_curves_draws_only_logged_numeric_keys(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "kl_mean": 0.01 * s, "note": "x"}) + "\n"
                            for s in range(1, 31)))
    keys = charts.plot_curves(path, tmp_path / "curves.png")
    assert keys == ["loss", "kl_mean"]
    assert Image.open(tmp_path / "curves.png").size == (900, 160)


def test_aggregate_over_seeds_is_mean_and_sample_std(tmp_path):
    files = []
    for seed, acc in enumerate([0.80, 0.90]):
        m = {"accuracy": acc, "uar": 0.5, "macro_f1": 0.5, "format_rate": 1.0}
        files.append(tmp_path / f"r{seed}.json")
        files[-1].write_text(json.dumps({"results": {"cliplow": m}}))
    table = evaluation.aggregate([str(f) for f in files])
    # mean 85.0, sample std of (80, 90) = 7.07
    assert "| cliplow | 2 | 85.0 +- 7.1 | 50.0 +- 0.0 | 50.0 +- 0.0 | 100.0 +- 0.0 |" in table


def test_markdown_table_rows_and_percentages():
    m = evaluation.classification_metrics(["anger", "awe"], ["anger", "fear"], formats=[1, 0])
    lines = evaluation.markdown_table({"stage4": m}).splitlines()
    assert lines[0].startswith("| model | Acc | UAR | F1 |") and len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # acc 1/2; UAR and macro-F1 over the present classes: anger (R=1, F1=1), fear (R=0, F1=0);
    # valence: anger->anger right, fear->awe wrong; format 1/2; no invalid answers
    assert cells[:7] == ["stage4", "50.0", "50.0", "50.0", "50.0", "50.0", "0.0"]
    assert cells[7] == "-"                                 # amusement: absent from the labels


def test_sft_nonfinite_loss_stops_before_the_step(tmp_path, tiny_model_dir, toy_data, monkeypatch):
    real = sft.sft_loss
    monkeypatch.setattr(sft, "sft_loss", lambda model, batch: real(model, batch) * float("nan"))
    with pytest.raises(SystemExit, match="stopped at step 1: non-finite loss"):
        sft.main(["--mode", "label", "--model", str(tiny_model_dir), "--data", str(toy_data),
                  "--out", str(tmp_path / "r"), "--steps", "2", "--eval-every", "0", "--batch-size", "4"])
    assert not (tmp_path / "r" / "checkpoint").exists()   # nothing written from a poisoned step


def test_bar_chart_bars_error_bars_and_reference_line(tmp_path):
    rows = {"baseline": [40.0, 50.0, 60.0], "stage4": [80.0, 80.0, 80.0]}
    img = charts.bar_chart_png(rows, tmp_path / "bars.png", "t", reference=("ceiling", 95.0))
    assert Image.open(tmp_path / "bars.png").size == img.size
    px = img.convert("RGB")
    # geometry of bar_chart_png: y = top + plot_h - v / y_max * plot_h, y_max = 1.08 * max drawn value
    top, plot_h, left, gap, bar_w = 40, 300, 50, 22, 56
    y_max = 95.0 * 1.08
    y_of = lambda v: round(top + plot_h - v / y_max * plot_h)  # noqa: E731
    x_bar = lambda i: left + gap + i * (bar_w + gap)  # noqa: E731
    assert px.getpixel((x_bar(0) + 3, y_of(49))) == charts.BAR_COLORS[0]     # bar up to the mean 50
    assert px.getpixel((x_bar(0) + 3, y_of(52))) == (255, 255, 255)              # and not beyond it
    assert px.getpixel((x_bar(1) + 3, y_of(79))) == charts.BAR_COLORS[1]
    xc = x_bar(0) + bar_w // 2
    assert px.getpixel((xc, y_of(58))) == (0, 0, 0)                               # error bar reaches 50 + std 10
    assert px.getpixel((xc, y_of(62))) != (0, 0, 0)
    assert px.getpixel((x_bar(1) + bar_w // 2, y_of(85))) != (0, 0, 0)            # std 0: no error bar
    assert (200, 0, 0) in {px.getpixel((x, y_of(95.0))) for x in range(left, left + 10)}  # dashed ceiling
    with pytest.raises(ValueError, match="at least one value"):
        charts.bar_chart_png({"empty": []}, tmp_path / "x.png")


def test_curves_side_by_side_one_column_per_run_shared_rows(tmp_path):
    runs = {}
    for name, zero in (("stage2", 0.9), ("stage3", 0.5)):
        files = []
        for seed in range(2):
            f = tmp_path / f"{name}_{seed}.jsonl"
            f.write_text("".join(json.dumps({"step": s, "frac_zero_std": zero, "kl_mean": 0.001 * s * (seed + 1),
                                             **({"reward_accuracy": 0.5} if name == "stage3" else {})}) + "\n"
                                 for s in range(1, 11)))
            files.append(f)
        runs[name] = files
    keys = charts.curves_side_by_side_png(runs, tmp_path / "side.png")
    assert keys == ["reward_accuracy", "kl_mean", "frac_zero_std"]  # unlogged keys are left out
    assert Image.open(tmp_path / "side.png").size == (95 + 2 * 260 + 10, 20 + 3 * 120 + 10)


def test_stage_table_mean_std_zero_std_and_ceiling():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import stage_table

    per_seed = [{"baseline": {"accuracy": 0.5, "zero_std": None}, "stage3": {"accuracy": 0.7, "zero_std": 0.2}},
                {"baseline": {"accuracy": 0.6, "zero_std": None}, "stage3": {"accuracy": 0.9, "zero_std": 0.4}}]
    rows = stage_table.stage_rows(per_seed)
    assert rows["stage3"] == {"accuracy": [0.7, 0.9], "zero_std": [0.2, 0.4]}
    assert "zero_std" not in rows["baseline"]
    table = stage_table.markdown(rows, [0.95, 0.96])
    # stage3: mean 80.0, sample std of (70, 90) = 14.1; zero-std mean 30.0 +- 14.1
    assert "| stage3 | 2 | 80.0 +- 14.1 | - | - | - | 30.0 +- 14.1 | 70.0, 90.0 |" in table
    assert "| baseline | 2 | 55.0 +- 7.1 | - | - | - | - | 50.0, 60.0 |" in table
    assert stage_table.ceiling_of({"splits": {"test": {"n": 400, "noisy_labels": 18}}}) == pytest.approx(0.955)
    assert stage_table.zero_std_share([{"frac_zero_std": 1.0}, {"loss": 2.0}, {"frac_zero_std": 0.5}]) == 0.75


def test_stage_table_reports_entropy_kl_and_clip_fractions_of_rl_runs():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import stage_table

    log = [{"step": 1, "entropy": 0.5, "kl_mean": 0.0, "frac_clipped_lower": 0.0, "frac_clipped_upper": 0.02},
           {"step": 2, "val_accuracy": 0.5},                     # an eval line: no training keys
           {"step": 3, "entropy": 0.3, "kl_mean": 0.1, "frac_clipped_lower": 0.01, "frac_clipped_upper": 0.0}]
    stats = stage_table.training_stats(log)
    assert stats["entropy"] == pytest.approx(0.4) and stats["entropy_max"] == 0.5
    assert stats["frac_clipped_lower"] == pytest.approx(0.005) and stats["frac_clipped_upper_max"] == 0.02
    assert stage_table.training_stats([{"step": 1, "loss": 1.0}]) == {}          # an SFT log
    per_seed = [{"stage3": {"accuracy": 0.7, **stats}, "stage3@T1": {"accuracy": 0.5, **stats}},
                {"stage3": {"accuracy": 0.9, **{k: 2 * v for k, v in stats.items()}}}]
    table = stage_table.training_markdown(stage_table.stage_rows(per_seed))
    # entropy: seeds 0.4 and 0.8 -> 0.6 +- 0.283, the largest step 1.0; KL: 0.05 and 0.1 -> 0.075 +- 0.035,
    # max 0.2; clipped low %: 0.5 and 1.0 -> 0.75 +- 0.35, max 2; clipped high %: 1 and 2 -> 1.5 +- 0.71, max 4
    assert ("| stage3 | 0.600 +- 0.283 (1.000) | 0.075 +- 0.035 (0.200) | 0.75 +- 0.35 (2.00) "
            "| 1.50 +- 0.71 (4.00) |") in table
    assert "@T1" not in table
    assert stage_table.training_markdown(stage_table.stage_rows([{"baseline": {"accuracy": 0.5}}])) == ""


def test_sampled_eval_gives_samples_per_image_and_greedy_is_one(tiny, toy_data):
    import torch

    model, processor = tiny
    records, _ = read_emoset_split(toy_data, "test", limit=3)
    greedy = evaluation.predict(model, processor, toy_data, records, max_new_tokens=8, progress=False)
    assert [p["id"] for p in greedy] == [r["id"] for r in records]
    torch.manual_seed(0)
    sampled = evaluation.predict(model, processor, toy_data, records, max_new_tokens=8, progress=False,
                                 temperature=1.0, samples=2)
    assert [p["id"] for p in sampled] == [r["id"] for r in records for _ in range(2)]
    with pytest.raises(ValueError, match="samples=1"):
        evaluation.predict(model, processor, toy_data, records, progress=False, samples=2)


def test_stage_table_reads_facts_of_counting_rule_runs(tmp_path):
    import json
    import sys
    from pathlib import Path

    import toy
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import stage_table

    run = tmp_path / "run"
    toy.write_toy_dataset(run / "data", "stepwise", seed=0, sizes={"train": 2, "val": 2, "test": 4})
    records, _ = read_emoset_split(run / "data", "test")
    truth = [read_annotation(run / "data", r)["toy"] for r in records]
    (run / "stage1").mkdir()
    (run / "stage1" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for folder, right in (("eval", 4), ("eval_t1", 1)):   # greedy states every fact right; sampled, 1 of 4
        preds = []
        for k, (r, t) in enumerate(zip(records, truth)):
            count = t["count"] if k < right else t["count"] % 4 + 1
            think = toy_teachers.reasoning_for("terse", t["background"], t["color"], None, t["rule_emotion"], count)
            emotion = toy.counting_rule(t["background"], t["color"], count)
            preds.append({"id": r["id"], "label": r["label"], "completion": f"<think>{think}</think>",
                          "pred": emotion})
        (run / folder).mkdir()
        (run / folder / "predictions_stage1.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        (run / folder / "results.json").write_text(json.dumps(
            {"split": "test", "results": {"stage1": {"accuracy": right / 4, "model": str(run / "stage1")}}}))
    rows, split = stage_table.run_results(run)
    assert split == "test" and list(rows) == ["stage1", "stage1@T1"]
    assert rows["stage1"]["fact_count"] == 1.0 and rows["stage1"]["fact_background"] == 1.0
    assert rows["stage1@T1"]["fact_count"] == 0.25 and rows["stage1@T1"]["fact_all three"] == 0.25
    assert rows["stage1@T1"]["fact_implied answer"] == 0.25   # a wrong count implies another emotion


def test_eval_append_adds_rows_one_at_a_time_as_one_run_would(tmp_path, tiny_model_dir, toy_data, one_thread):
    """demo.sh evaluates each checkpoint when its stage is ready: rows added one per call with
    --append must equal the rows of one call over both models (sampled rows too: each row
    starts from the same seed), in call order, and a rerun of a name replaces its row."""
    common = ["--data", str(toy_data), "--limit", "6", "--max-new-tokens", "8", "--temperature", "1",
              "--samples", "2", "--seed", "3"]
    both, one_by_one = tmp_path / "both", tmp_path / "one_by_one"
    evaluation.main(common + ["--out", str(both), "--model", str(tiny_model_dir), "--name", "a",
                              "--model", str(tiny_model_dir), "--name", "b"])
    for name in ("b", "a", "b"):
        evaluation.main(common + ["--out", str(one_by_one), "--append", "--model", str(tiny_model_dir), "--name", name])
    joint = json.loads((both / "results.json").read_text())
    split = json.loads((one_by_one / "results.json").read_text())
    assert list(split["results"]) == ["b", "a"]          # first appearance sets the order
    for name in ("a", "b"):
        drop = {"seconds"}
        assert ({k: v for k, v in split["results"][name].items() if k not in drop}
                == {k: v for k, v in joint["results"][name].items() if k not in drop})
        assert ((one_by_one / f"predictions_{name}.jsonl").read_text()
                == (both / f"predictions_{name}.jsonl").read_text())
    assert split["n"] == joint["n"] == 6


def test_eval_append_refuses_rows_of_another_split_or_size(tmp_path, tiny_model_dir, toy_data, capsys):
    out = tmp_path / "eval"
    base = ["--data", str(toy_data), "--max-new-tokens", "4", "--out", str(out), "--model", str(tiny_model_dir)]
    evaluation.main(base + ["--limit", "3"])
    with pytest.raises(SystemExit, match="on split test with 3 records, this evaluation on test with 4"):
        evaluation.main(base + ["--limit", "4", "--append"])
    (out / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a results.json of eval.py"):
        evaluation.main(base + ["--limit", "3", "--append"])


def test_periodic_validation_runs_every_n_steps_and_at_the_last(monkeypatch):
    """Validation at steps 3, 6 and the last (7) of a 7-step run with eval_every 3; {} elsewhere and
    when there is no validation set; the model is put back in training mode after each one."""
    calls = []
    monkeypatch.setattr(evaluation, "evaluate", lambda model, *a, **k: calls.append(a[2]) or
                        ({"accuracy": 0.25, "format_rate": 0.75}, []))
    model = torch.nn.Linear(1, 1).eval()
    cfg = types.SimpleNamespace(eval_every=3, steps=7, data="root", max_new_tokens=4)
    got = {s: evaluation.periodic_validation(model, None, cfg, [{"id": 1}], s, {}) for s in range(1, 8)}
    assert [s for s, m in got.items() if m] == [3, 6, 7] and len(calls) == 3
    assert got[7] == {"val_accuracy": 0.25, "val_format_rate": 0.75} and model.training
    assert evaluation.periodic_validation(model, None, cfg, [], 3, {}) == {}
