"""The family matrix: every common <= 2B VLM family, on a tiny random build of its real
architecture with its real chat template and special tokens (tests/tiny_families.py), goes
through the whole code path: load, group sampling, log-probs, SFT batches, every command line."""

import json
import math

import pytest
import torch
from PIL import Image

import clgrpo
import eval as evaluation
import families
import sft
import vlm
from data import INSTRUCTION, read_emoset_split
from tiny_families import FAMILY_NAMES
from vision_checks import check_shared_features, random_completions, vision_rows

MODEL_TYPE = {"smolvlm2": "smolvlm"}  # family name -> config.model_type where they differ


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request, tiny_family_dir):
    name = request.param
    folder = tiny_family_dir(name)
    model, processor = families.load_model(folder)
    return name, folder, model, processor


def two_images():
    """Two images of different sizes (and content): prompts of different lengths for most families."""
    return [Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("RGB", (96, 64), (40, 40, 200))]


def test_family_facts_match_the_checkpoint(family):
    name, _, model, processor = family
    facts = families.FAMILIES[model.config.model_type]
    assert model.config.model_type == MODEL_TYPE.get(name, name)
    assert families.end_of_turn_token(processor) == facts.end_of_turn
    inputs = vlm.encode_prompts(processor, two_images())
    per_token = {k for k, v in inputs.items() if k not in ("input_ids", "attention_mask")
                 and v.shape[:2] == inputs["input_ids"].shape[:2]}
    assert per_token == set(facts.per_token)


def test_group_sampling_two_sizes(family):
    _, _, model, processor = family
    torch.manual_seed(0)
    images = two_images()
    once = vision_rows(model, lambda: model(**vlm.encode_prompts(processor, images)))
    rows = vision_rows(model, lambda: vlm.sample_completions(model, processor, images, group_size=3, max_new_tokens=6))
    assert rows == once  # the 2 images are encoded once for the 6 completions
    rollout = vlm.sample_completions(model, processor, images, group_size=3, max_new_tokens=6)
    assert rollout.completion_ids.shape[0] == 6 and len(rollout.texts) == 6
    assert rollout.prompts["input_ids"].shape[0] == 2
    kept = rollout.completion_ids[rollout.completion_mask.bool()]
    assert not torch.isin(kept, torch.tensor(vlm.blocked_token_ids(model, processor))).any()


def test_logprobs_micro_batched_alone_and_shared(family):
    _, _, model, processor = family
    images, g = two_images(), 3
    torch.manual_seed(1)
    eos = vlm.eos_token_ids(model, processor)
    completion = random_completions(model, processor, len(images) * g, 7)
    mask, _ = vlm.completion_mask_from_ids(completion, eos)
    prompts = vlm.encode_prompts(processor, images)
    with torch.no_grad():
        full = vlm.completion_logprobs(model, prompts, completion, mask, g)
        micro = vlm.completion_logprobs(model, prompts, completion, mask, g, micro_batch=2)
        assert (full - micro)[mask.bool()].abs().max().item() < 1e-5
        for r in (0, 4):  # one row alone == the same row in the batch
            alone = vlm.completion_logprobs(model, vlm.encode_prompts(processor, [images[r // g]]),
                                            completion[r:r + 1], mask[r:r + 1])
            assert (alone - full[r:r + 1])[mask[r:r + 1].bool()].abs().max().item() < 1e-5
        other = vlm.completion_logprobs(model, vlm.encode_prompts(processor, [images[1]]), completion[:1], mask[:1])
        assert (other - full[:1]).abs().max().item() > 1e-4  # and the image matters
    check_shared_features(model, processor, images, group_size=g)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sft_batch_meets_the_target_contract(family, padding_side):
    """prompt ids + reply ids == the chat template's own tokenised rendering of the conversation,
    cut right after the end-of-turn token; labels are exactly the reply (target + end of turn)."""
    _, _, _, processor = family
    tok = processor.tokenizer
    images = two_images()
    targets = ["<think>The background is dark and two blue circles.</think><answer>sadness</answer>",
               "<answer>awe</answer>"]
    batch = sft.build_sft_batch(processor, images, targets, padding_side)
    eot = tok.convert_tokens_to_ids(families.end_of_turn_token(processor))
    for i, (img, target) in enumerate(zip(images, targets)):
        conv = [{"role": "user",
                 "content": [{"type": "image", "image": img}, {"type": "text", "text": INSTRUCTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": target}]}]
        own = processor.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
        prompt = processor.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        own_ids, n_prompt = own["input_ids"][0], prompt["input_ids"].shape[1]
        cut = n_prompt + (own_ids[n_prompt:] == eot).nonzero()[0].item() + 1  # right after the end of turn
        keep = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][keep].tolist() == own_ids[:cut].tolist()
        labels = batch["labels"][i][keep]
        assert labels[:n_prompt].eq(sft.IGNORE).all() and labels[n_prompt:].tolist() == own_ids[n_prompt:cut].tolist()
        assert labels[-1].item() == eot
        assert tok.decode(labels[n_prompt:], skip_special_tokens=True).strip() == target
        if tok.bos_token_id is not None:
            assert (own_ids[:cut] == tok.bos_token_id).sum() <= 1  # never a second BOS
        for key, value in own.items():  # every per-token tensor rebuilt for the whole row
            if key not in ("input_ids", "attention_mask") and value.shape[:2] == own["input_ids"].shape[:2]:
                assert batch[key][i][keep].tolist() == value[0][:cut].tolist(), key


def test_image_token_budget_changes_image_tokens(family):
    """--max-image-tokens reaches each family's own knob: fewer tokens under a low budget than a
    high one, never more than the budget; a budget below one image's minimum is refused."""
    name, folder, _, _ = family
    big = Image.new("RGB", (256, 192), (90, 90, 90))

    def tokens(max_image_tokens):
        model, processor = families.load_model(folder, max_image_tokens=max_image_tokens)
        ids = vlm.encode_prompts(processor, [big])["input_ids"]
        return int((ids == model.config.image_token_id).sum())

    low, high = BUDGETS[name]
    with pytest.raises(ValueError, match="below"):
        tokens(low - 1)
    if name == "gemma3":  # a fixed number of tokens per image: the budget can only refuse
        assert tokens(low) == tokens(high) == tokens(None) == low
        return
    n_low, n_high = tokens(low), tokens(high)
    assert n_low <= low and n_high <= high and n_low < n_high, (n_low, n_high)


# (lowest budget the family accepts, a higher one) for the tiny builds: one crop/tile/patch grid vs several
BUDGETS = {"idefics3": (4, 20), "smolvlm2": (4, 20), "qwen2_vl": (4, 24), "qwen2_5_vl": (4, 24), "qwen3_vl": (4, 24),
           "internvl": (4, 20), "gemma3": (4, 8), "llava_next": (15, 30), "llava_onevision": (11, 30)}


def write_cot(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({**r, "think": "The background is dark.", "answer": r["label"]}) + "\n")


def test_every_command_line_runs_two_steps(family, toy_data, tmp_path):
    name, folder, _, _ = family
    records, _ = read_emoset_split(toy_data, "train", limit=8)
    write_cot(tmp_path / "cot.jsonl", records)
    common = ["--data", str(toy_data), "--steps", "2", "--batch-size", "2", "--eval-every", "0", "--save-every", "2"]
    for mode in ("cot", "label"):
        sft.main(["--mode", mode, "--model", str(folder), "--out", str(tmp_path / mode),
                  "--cot", str(tmp_path / "cot.jsonl"), "--warmup", "1", *common])
        lines = [json.loads(x) for x in open(tmp_path / mode / "metrics.jsonl")]
        assert len(lines) == 2 and all(math.isfinite(x["loss"]) for x in lines)
    clgrpo.main(["--stage", "3", "--model", str(tmp_path / "cot"), "--out", str(tmp_path / "rl"),
                 "--num-generations", "2", "--max-new-tokens", "8", "--lr", "1e-4",
                 "--max-image-tokens", str(BUDGETS[name][1]), *common])
    lines = [json.loads(x) for x in open(tmp_path / "rl" / "metrics.jsonl")]
    assert len(lines) == 2 and all(math.isfinite(x["reward_mean"]) for x in lines)
    evaluation.main(["--model", str(tmp_path / "rl"), "--data", str(toy_data), "--limit", "4", "--max-new-tokens", "8",
                     "--out", str(tmp_path / "eval")])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["n"] == 4 and all(math.isfinite(v["accuracy"]) for v in results["results"].values())


def test_templates_that_think_for_the_model_are_refused_at_load(tiny_family_dir, tmp_path):
    """A generation prompt that opens <think> (thinking variants), or an assistant turn that drops
    the reasoning, would corrupt SFT targets and the format reward: load_model refuses both."""
    import shutil

    source = tiny_family_dir("qwen2_vl")
    template = (source / "chat_template.jinja").read_text()
    thinking = template.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
    stripping = template.replace("{{ content['text'] }}", "{{ content['text'].split('</think>')[-1] }}")
    assert thinking != template and stripping != template
    for name, text, reason in (("thinking", thinking, "opens <think>"), ("stripping", stripping, "rewrites")):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        (folder / "chat_template.jinja").write_text(text)
        with pytest.raises(ValueError, match=reason) as err:
            families.load_model(folder)
        assert str(folder) in str(err.value)
