"""The tiny VLM and vlm.py: build/save/reload offline, sampling, masks, log-probs, checkpoints."""

from unittest import mock

import pytest
import torch

import checkpoints
import families
import vlm
from data import INSTRUCTION, load_image, read_emoset_split


@pytest.fixture(scope="module")
def images(toy_data):
    records, _ = read_emoset_split(toy_data, "train", limit=3)
    return [load_image(toy_data, r) for r in records]


def test_tiny_model_reloads_with_auto_classes_offline_and_generates(tiny_model_dir, images, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (tiny_model_dir / "model.safetensors").is_file()
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    processor.tokenizer.padding_side = "left"
    rollout = vlm.sample_completions(model, processor, images[:2], group_size=2, max_new_tokens=8)
    assert rollout.completion_ids.shape[0] == 4 and len(rollout.texts) == 4


def test_chat_prompt_holds_one_image_and_ends_with_generation_prompt(tiny):
    _, processor = tiny
    text = families.chat_prompt(processor)
    assert text.count("<image>") == 1 and INSTRUCTION in text and text.endswith("Assistant:")


def test_completion_mask_ends_at_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [9, 3, 2, 2]])
    mask, truncated = vlm.completion_mask_from_ids(ids, eos_ids=[2, 3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert truncated.tolist() == [False, True, False, False]


def test_draw_from_follows_the_probabilities_and_never_draws_a_zero():
    """Inverse-CDF draw: frequencies over 40,000 rows match p (within 5 standard errors), a
    p = 0 entry (first, middle, last) is never drawn, and a uniform that rounds up to the total,
    or a search that lands on a p = 0 entry, gives the last entry with p > 0."""
    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.1, 0.0, 0.55, 0.05, 0.3, 0.0])
    n = 40_000
    drawn = vlm.draw_from(p.expand(n, -1))
    freq = torch.bincount(drawn, minlength=len(p)).double() / n
    assert freq[p == 0].sum() == 0
    se = (p * (1 - p) / n).double().sqrt()
    assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all(), freq
    unnormalised = p.expand(3, -1) * torch.tensor([[1.0], [2.0], [0.5]])   # scale does not matter
    with mock.patch.object(torch, "rand_like", lambda t: torch.ones_like(t)):  # u = 1: u * total = total
        assert vlm.draw_from(unnormalised).tolist() == [5, 5, 5]
    with mock.patch.object(torch, "rand_like", lambda t: torch.zeros_like(t)):  # u = 0: the first p > 0
        assert vlm.draw_from(unnormalised).tolist() == [1, 1, 1]
    search = torch.searchsorted   # a cumsum that rounded c_2 above c_1 (p_2 = 0) leads the search to 2
    with mock.patch.object(torch, "searchsorted", lambda cdf, u, right: search(cdf, u, right=right) * 0 + 2):
        assert vlm.draw_from(unnormalised).tolist() == [5, 5, 5]


def test_next_tokens_samples_softmax_over_temperature_within_top_p():
    """_next_tokens draws from softmax(logits / T) renormalised over the top-p nucleus, with the
    blocked tokens out: each surviving token at its rate, the rest never."""
    torch.manual_seed(1)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    n, temperature, top_p = 40_000, 0.8, 0.9
    drawn = vlm._next_tokens(logits.expand(n, -1), True, temperature, top_p, blocked=[5])
    p = torch.softmax(logits[:5] / temperature, dim=-1)          # token 5 blocked
    ordered, order = p.sort(descending=True)
    keep = order[(ordered.cumsum(0) - ordered) < top_p]           # smallest set reaching top_p
    target = torch.zeros(6)
    target[keep] = p[keep] / p[keep].sum()
    freq = torch.bincount(drawn, minlength=6).double() / n
    assert freq[target == 0].sum() == 0 and len(keep) < 5
    se = (target * (1 - target) / n).double().sqrt()
    assert ((freq - target.double()).abs() <= 5 * se + 1e-12).all(), (freq, target)


def test_sampling_never_emits_blocked_tokens(tiny, images):
    model, processor = tiny
    torch.manual_seed(0)
    rollout = vlm.sample_completions(model, processor, images, group_size=4, max_new_tokens=24, temperature=1.5)
    blocked = torch.tensor(vlm.blocked_token_ids(model, processor))
    assert processor.image_token_id in blocked.tolist()
    kept = rollout.completion_ids[rollout.completion_mask.bool()]
    assert not torch.isin(kept, blocked).any()
    assert rollout.completion_ids.shape[0] == 12 and rollout.prompts["input_ids"].shape[0] == 3  # one row per prompt


def test_logprobs_equal_log_softmax_of_raw_generation_logits(tiny, images):
    model, processor = tiny
    torch.manual_seed(1)
    inputs = vlm.encode_prompts(processor, images[:2])
    eos = vlm.eos_token_ids(model, processor)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=0, return_dict_in_generate=True,
                         output_logits=True, suppress_tokens=vlm.blocked_token_ids(model, processor),
                         eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id)
    completion = out.sequences[:, inputs["input_ids"].shape[1]:]
    mask, _ = vlm.completion_mask_from_ids(completion, eos)
    raw = torch.stack(out.logits, dim=1).float()
    for temperature in (1.0, 0.7):
        expected = torch.log_softmax(raw / temperature, dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            got = vlm.completion_logprobs(model, inputs, completion, mask, temperature=temperature)
        assert (got - expected)[mask.bool()].abs().max().item() < 1e-4


def test_logprobs_same_alone_and_in_a_left_padded_batch(tiny, images):
    """Other images, other prompt lengths, G > 1: each row keeps its own image and prompt."""
    model, processor = tiny
    prompts = [families.chat_prompt(processor), families.chat_prompt(processor, "Emotion?"),
               families.chat_prompt(processor, "Which emotion, in one word?")]
    group = 2
    torch.manual_seed(2)
    batch = vlm.encode_prompts(processor, images, prompts)
    assert (batch["attention_mask"] == 0).any()  # really left-padded
    completion = torch.randint(10, 300, (len(images) * group, 9))
    completion[0, 5] = vlm.eos_token_ids(model, processor)[0]
    mask, _ = vlm.completion_mask_from_ids(completion, vlm.eos_token_ids(model, processor))
    with torch.no_grad():
        full = vlm.completion_logprobs(model, batch, completion, mask, group_size=group)
        batched = vlm.completion_logprobs(model, batch, completion, mask, group_size=group, micro_batch=4)
        assert (full - batched)[mask.bool()].abs().max().item() < 1e-5
        for i in range(len(completion)):
            alone_inputs = vlm.encode_prompts(processor, [images[i // group]], [prompts[i // group]])
            alone = vlm.completion_logprobs(model, alone_inputs, completion[i:i + 1], mask[i:i + 1])
            assert (alone - batched[i:i + 1])[mask[i:i + 1].bool()].abs().max().item() < 1e-5
        # and the images matter: the same tokens under another row's image score differently
        swapped = vlm.encode_prompts(processor, [images[1]], [prompts[0]])
        other = vlm.completion_logprobs(model, swapped, completion[:1], mask[:1])
        assert (other - batched[:1]).abs().max().item() > 1e-4


def test_entries_per_prompt_groups_vision_outputs_by_placeholder_count():
    # e.g. tiles: prompt 0 has 2 tiles of 4 tokens, prompt 1 one image of 6 tokens, prompt 2 one of 4
    assert vlm._entries_per_prompt([4, 4, 6, 4], [8, 6, 4]) == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="prompt 1"):
        vlm._entries_per_prompt([4, 4, 6], [8, 5])
    with pytest.raises(ValueError, match="no prompt"):
        vlm._entries_per_prompt([4, 4, 6], [8])


def test_row_inputs_index_prompt_tensors_and_leave_pixels_out():
    prompts = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "image_grid_thw": torch.tensor([[1, 2, 2], [1, 4, 2]]),
               "pixel_values": torch.zeros(16, 3)}
    rows = vlm.row_inputs(prompts, [0, 0, 1])
    assert rows["input_ids"].tolist() == [[1, 2], [1, 2], [3, 4]] and "pixel_values" not in rows
    assert rows["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2], [1, 4, 2]]
    with pytest.raises(ValueError, match="num_tiles"):
        vlm.row_inputs({**prompts, "num_tiles": torch.tensor([1, 2, 3])}, [0])


def test_save_checkpoint_is_atomic(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    out = tmp_path / "ckpt"
    checkpoints.save_checkpoint(model, processor, out, trainer_state={"step": 1})
    assert torch.load(out / "trainer_state.pt")["step"] == 1

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(processor, "save_pretrained", crash)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(model, processor, out, trainer_state={"step": 2})
    assert torch.load(out / "trainer_state.pt")["step"] == 1  # the old checkpoint survives whole
    monkeypatch.undo()
    checkpoints.save_checkpoint(model, processor, out, trainer_state={"step": 3})
    assert torch.load(out / "trainer_state.pt")["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left
    reloaded, _ = families.load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_vision_once_per_pass_equals_repeated_images(tiny, images):
    from vision_checks import check_shared_features, vision_rows

    model, processor = tiny
    check_shared_features(model, processor, images[:2], group_size=3)
    torch.manual_seed(0)
    sampled = vision_rows(model, lambda: vlm.sample_completions(model, processor, images[:2], group_size=3,
                                                                max_new_tokens=4))
    assert sampled == 2  # generation encodes the 2 images once for the 6 rows
