"""The prompt once per group (vlm.prompt_states): each prompt's keys and values are computed for
B rows and shared by its G completion rows, in every log-prob pass and in sampling. Proven equal
to the per-row path (every row runs its whole prompt) on the toy and on every family of the
matrix: log-probs to 1e-5, parameter gradients to rtol 1e-4, with left padding (images of two
sizes), Qwen's 3-D mrope positions and Gemma 3's token types, with LoRA; and the prompt
positions computed per pass are B rows, not B x G."""

import copy
from unittest import mock

import pytest
import torch
from PIL import Image
from transformers.modeling_layers import GradientCheckpointingLayer

import families
import kv_cache
import lora
import vlm
from tiny_families import FAMILY_NAMES
from vision_checks import random_completions

G = 3


def two_images():
    """Two images of different sizes: prompts of different lengths (left padding) for most families."""
    return [Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("RGB", (96, 64), (40, 40, 200))]


@pytest.fixture(scope="module", params=("toy",) + FAMILY_NAMES)
def family(request, tiny_family_dir, tiny_model_dir):
    folder = tiny_model_dir if request.param == "toy" else tiny_family_dir(request.param)
    model, processor = families.load_model(folder)
    return request.param, model, processor


def batch(model, processor, tokens=7, seed=1):
    torch.manual_seed(seed)
    images = two_images()
    completion = random_completions(model, processor, len(images) * G, tokens)
    completion[0, 3] = vlm.eos_token_ids(model, processor)[0]  # one row ends early: a mask with zeros
    mask, _ = vlm.completion_mask_from_ids(completion, vlm.eos_token_ids(model, processor))
    return vlm.encode_prompts(processor, images), completion, mask


def grads_of(model, prompts, completion, mask, shared, micro_batch):
    """Parameter gradients of the summed log-probs, micro-batched with gradient accumulation."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    features = vlm.encode_images(model, prompts, chunked_backward=True)
    n = completion.shape[0]
    for s in range(0, n, micro_batch):
        e = min(n, s + micro_batch)
        lp = vlm.completion_logprobs(model, prompts, completion[s:e], mask[s:e], G, features=features,
                                     first_row=s, shared_prompt=shared)
        lp[mask[s:e].bool()].sum().backward()
    features.backward()
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad(set_to_none=True)
    return got


def check_equal(model, processor):
    prompts, completion, mask = batch(model, processor)
    keep = mask.bool()
    with torch.no_grad():
        per_row = vlm.completion_logprobs(model, prompts, completion, mask, G, shared_prompt=False)
        for micro in (None, 2, 4):
            shared = vlm.completion_logprobs(model, prompts, completion, mask, G, micro_batch=micro,
                                             shared_prompt=True)
            assert (shared - per_row)[keep].abs().max().item() < 1e-5, micro
    expected = grads_of(model, prompts, completion, mask, False, 6)
    for micro in (6, 4):
        got = grads_of(model, prompts, completion, mask, True, micro)
        assert any(g.abs().sum() > 0 for g in got)
        for a, b in zip(got, expected):  # atol: float32 sums in another order (G rows summed into one prompt state)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"gradient differs by {(a - b).abs().max().item()}"


def test_shared_prompt_equals_per_row(family):
    name, model, processor = family
    if not vlm.shares_prompt(model):
        pytest.skip(f"{name}: falls back to the per-row path (Family.shared_prompt)")
    check_equal(model, processor)


def test_prompt_positions_computed_once_per_group(family):
    """A hook on the input embeddings counts the rows that run the prompt: B per pass, not B x G."""
    name, model, processor = family
    if not vlm.shares_prompt(model):
        pytest.skip(f"{name}: falls back to the per-row path")
    prompts, completion, mask = batch(model, processor)
    p = prompts["input_ids"].shape[1]
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    try:
        with torch.no_grad():
            vlm.completion_logprobs(model, prompts, completion, mask, G, shared_prompt=True)
            shared = list(seen)
            seen.clear()
            vlm.completion_logprobs(model, prompts, completion, mask, G, shared_prompt=False)
            per_row = list(seen)
    finally:
        hook.remove()
    b, n, t = 2, 2 * G, completion.shape[1]
    assert sum(r for r, c in shared if c == p) == b          # the prompt: B rows
    assert sum(r * c for r, c in shared) == b * p + n * (t - 1)
    assert sum(r * c for r, c in per_row) == n * (p + t)


@pytest.mark.parametrize("name", ["toy", "qwen2_vl", "gemma3"])
def test_shared_prompt_with_lora(name, tiny_family_dir, tiny_model_dir):
    folder = tiny_model_dir if name == "toy" else tiny_family_dir(name)
    model, processor = families.load_model(folder)
    lora.add_lora(model, rank=4, alpha=8.0)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)  # adapters that change the output
    if not vlm.shares_prompt(model):
        pytest.skip(f"{name}: falls back to the per-row path")
    check_equal(model, processor)


def test_activation_checkpointing_keeps_the_prompt_shared(family):
    """With activation checkpointing the prompt is still run once per group: the prompt pass's
    cache keeps its first write and the completion pass only reads it, so the layers' replays in
    the backward pass are safe. The gradients equal the plain model's on the per-row path, and
    the layers are really replayed (their attention runs again during backward)."""
    name, model, processor = family
    if not vlm.shares_prompt(model):
        pytest.skip(f"{name}: falls back to the per-row path")
    model = copy.deepcopy(model)   # the fixture's model is shared by later tests: leave it unchanged
    prompts, completion, mask = batch(model, processor)
    model.train()
    expected = grads_of(model, prompts, completion, mask, False, 6)
    families.enable_activation_checkpointing(model)
    model.train()
    assert vlm.shares_prompt(model)
    phase, calls = ["forward"], {"forward": 0, "backward": 0}
    attention = [m for m in model.modules()
                 if hasattr(m, "layer_idx") and not isinstance(m, GradientCheckpointingLayer)]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(phase[0], calls[phase[0]] + 1)) for m in attention]
    try:
        for micro in (6, 4):
            with mock.patch.object(torch.Tensor, "backward", counting_backward(phase)):
                got = grads_of(model, prompts, completion, mask, True, micro)
            for a, b in zip(got, expected):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"gradient differs by {(a - b).abs().max().item()}"
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["forward"] > 0 and calls["backward"] == calls["forward"], calls   # every layer run is replayed


def test_replay_safe_cache_layers():
    """A checkpointed layer runs its forward twice (forward, then the replay in backward): the
    prompt pass's layer keeps its first write, the completion pass's never grows; decoding's
    layer holds what torch.cat would."""
    keys, values, again = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    first = kv_cache.KeepFirstLayer()
    for call in (keys, again):              # the forward, then its replay
        assert first.update(call, call)[0] is call
    assert first.keys is keys and first.get_seq_length() == 3
    read = kv_cache.rows_cache([(keys, values)]).layers[0]
    new = torch.randn(2, 1, 5, 4)
    for _ in range(2):
        k, v = read.update(new, new)
        assert torch.equal(k, torch.cat([keys, new], dim=2)) and torch.equal(v, torch.cat([values, new], dim=2))
    assert read.get_seq_length() == 3
    grows = kv_cache.rows_cache([(keys, values)], new_tokens=6).layers[0]
    for step in range(2):                   # decoding appends, in place (room for 6 tokens)
        token = torch.randn(2, 1, 1, 4)
        k, v = grows.update(token, token + 1)
        keys, values = torch.cat([keys, token], dim=2), torch.cat([values, token + 1], dim=2)
        assert torch.equal(k, keys) and torch.equal(v, values) and grows.get_seq_length() == 4 + step


def counting_backward(phase):
    """Tensor.backward that marks the attention calls it triggers as replays."""
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        phase[0] = "backward"
        try:
            return original(self, *args, **kwargs)
        finally:
            phase[0] = "forward"
    return backward


def test_a_decoding_step_is_the_full_models_bit_for_bit(family):
    """A decoding step runs the language model and the LM head alone (no image token follows the
    prompt): two steps from the shared prompt cache give the full VLM's logits, bit for bit; and
    without padding, a step given no mask gives the masked full model's logits."""
    name, model, processor = family
    prompts = vlm.encode_prompts(processor, two_images())
    index, tokens = torch.tensor([0, 0, 1]), random_completions(model, processor, 3, 2)
    with torch.no_grad():
        states = vlm.prompt_states(model, prompts, vlm.encode_images(model, prompts), [0, 1], 2)
        (alone, mask, positions), (full, _, _) = states.for_rows(index, True), states.for_rows(index, True)
        for j in range(2):
            step_mask = torch.cat([mask, mask.new_ones(3, j + 1)], dim=1)
            args = (tokens[:, j:j + 1], step_mask, positions[..., j:j + 1])
            got = vlm._decoding_step_for(model)(alone, *args)
            want = vlm._full_forward_step(model, full, *args)
            assert torch.equal(got, want), (name, j)
    one_prompt = vlm.encode_prompts(processor, two_images()[:1])   # no padding: decoding passes no mask
    with torch.no_grad():
        states = vlm.prompt_states(model, one_prompt, vlm.encode_images(model, one_prompt), [0], 1)
        rows = torch.tensor([0, 0])
        (alone, mask, positions), (full, _, _) = states.for_rows(rows, True), states.for_rows(rows, True)
        step_mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
        got = vlm._decoding_step_for(model)(alone, tokens[:2, :1], None, positions[..., :1])
        want = vlm._full_forward_step(model, full, tokens[:2, :1], step_mask, positions[..., :1])
        assert torch.equal(got, want), name


def test_greedy_sampling_from_the_shared_prompt_equals_generate(family, monkeypatch):
    """Greedy decoding from the shared prompt cache gives generate()'s tokens, token for token."""
    name, model, processor = family
    if not vlm.shares_prompt(model):
        pytest.skip(f"{name}: falls back to generate()")
    images = two_images()
    shared = vlm.sample_completions(model, processor, images, group_size=1, max_new_tokens=8, do_sample=False)
    monkeypatch.setattr(vlm, "shares_prompt", lambda m: False)
    generated = vlm.sample_completions(model, processor, images, group_size=1, max_new_tokens=8, do_sample=False)
    assert shared.completion_ids.tolist() == generated.completion_ids.tolist()
    assert shared.texts == generated.texts


def test_a_model_that_soft_caps_its_logits_decodes_through_the_full_forward(tiny, monkeypatch):
    """The language model alone would skip a final soft-cap of the logits, which the VLM's head
    applies (Gemma 2-based models): such a model takes the full forward at every step."""
    model, processor = tiny
    text_config = getattr(model.config, "text_config", model.config)
    monkeypatch.setattr(text_config, "final_logit_softcapping", 30.0, raising=False)
    calls = []
    continue_rows = vlm._continue_rows
    monkeypatch.setattr(vlm, "_continue_rows", lambda *a: (calls.append(1), continue_rows(*a))[1])
    vlm.sample_completions(model, processor, two_images(), group_size=2, max_new_tokens=4)
    assert len(calls) >= 1


def test_finished_rows_leave_decoding_without_changing_the_others(half_format_model, toy_data, monkeypatch):
    """Rows that have ended are dropped from the batch (with their cache rows) as decoding goes on:
    completions that end at different steps are the same with and without the drop, token for
    token, and rows were dropped. To compare the two runs, the draw is made a function of each
    row's own probabilities (the uniform fixed at 0.3: the rows end after 18 to 48 tokens)."""
    from data import load_images, read_emoset_split
    model, processor = families.load_model(half_format_model)
    records, _ = read_emoset_split(toy_data, "train")
    _, images = load_images(toy_data, records[:6], {})
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.full_like(t, 0.3))
    drops = []
    keep_rows = kv_cache.GrowingLayer.keep_rows
    monkeypatch.setattr(kv_cache.GrowingLayer, "keep_rows",
                        lambda self, index: (drops.append(len(index)), keep_rows(self, index))[1])
    dropping = vlm.sample_completions(model, processor, images, max_new_tokens=48)
    monkeypatch.setattr(vlm, "DROP_FINISHED", 2.0)   # never: every row stays to the end
    kept = vlm.sample_completions(model, processor, images, max_new_tokens=48)
    lengths = dropping.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 3 and drops, (lengths, drops)
    assert torch.equal(dropping.completion_ids, kept.completion_ids)


def test_seeded_group_sampling_from_the_shared_prompt(tiny):
    """G rows per prompt, a fixed seed repeats the draw, finished rows are padded after their EOS.
    (The draw itself: test_vlm's draw_from and _next_tokens tests.)"""
    model, processor = tiny
    images, eos, pad = two_images(), vlm.eos_token_ids(model, processor), processor.tokenizer.pad_token_id
    torch.manual_seed(3)
    a = vlm.sample_completions(model, processor, images, group_size=4, max_new_tokens=12, temperature=1.3, top_p=0.9)
    torch.manual_seed(3)
    b = vlm.sample_completions(model, processor, images, group_size=4, max_new_tokens=12, temperature=1.3, top_p=0.9)
    assert a.completion_ids.shape[0] == 8 and a.completion_ids.shape[1] <= 12
    assert torch.equal(a.completion_ids, b.completion_ids)
    ids, mask = a.completion_ids, a.completion_mask
    assert (ids[mask == 0] == pad).all()                                   # after the first EOS: padding
    assert torch.equal(a.truncated, ~torch.isin(ids, torch.tensor(eos)).any(1))
    kept = ids[mask.bool()]
    assert not torch.isin(kept, torch.tensor(vlm.blocked_token_ids(model, processor))).any()
