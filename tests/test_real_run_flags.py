"""The flags of docs/real_run.md's commands, run on the toy model and on three
families (Qwen2-VL, InternVL, LLaVA-NeXT with its SentencePiece tokenizer): --bf16 (CPU
autocast), --gradient-checkpointing, --freeze-vision, --ref-dtype bfloat16, --micro-batch,
--logp-micro-batch and --grad-accum, each through the command line with finite metrics.
Gradient checkpointing gives the same gradients as without it through the shared image features
and their split backward; --freeze-vision leaves the tower bit-identical and still encodes each
image once per pass."""

import json
import math

import pytest
import torch
from PIL import Image

import clgrpo
import families
import sft
import vlm
from data import read_emoset_split
from vision_checks import VisionInputCounter, random_completions, vision_tower

MODELS = ("toy", "qwen2_vl", "internvl", "llava_next")
GPU_FLAGS = ["--bf16", "--gradient-checkpointing", "--freeze-vision"]   # docs/real_run.md's $GPU, minus --device cuda


@pytest.fixture(params=MODELS)
def model_dir(request, tiny_model_dir, tiny_family_dir):
    return tiny_model_dir if request.param == "toy" else tiny_family_dir(request.param)


def read_metrics(folder):
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def test_the_readme_real_run_flags_through_the_command_lines(model_dir, toy_data, tmp_path):
    records, _ = read_emoset_split(toy_data, "train", limit=8)
    with open(tmp_path / "cot.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({**r, "think": "The background is dark.", "answer": r["label"]}) + "\n")
    common = ["--data", str(toy_data), "--steps", "1", "--eval-every", "0", "--save-every", "1", *GPU_FLAGS]
    sft.main(["--mode", "cot", "--cot", str(tmp_path / "cot.jsonl"), "--model", str(model_dir),
              "--out", str(tmp_path / "sft"), "--batch-size", "2", "--grad-accum", "2", "--warmup", "1",
              "--lr", "1e-3", *common])
    (line,) = read_metrics(tmp_path / "sft")
    assert math.isfinite(line["loss"]) and line["grad_norm"] > 0
    clgrpo.main(["--stage", "3", "--model", str(tmp_path / "sft"), "--out", str(tmp_path / "rl"),
                 "--ref-dtype", "bfloat16", "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "6",
                 "--micro-batch", "1", "--logp-micro-batch", "3", "--lr", "1e-3", *common])
    (line,) = read_metrics(tmp_path / "rl")
    numbers = ["loss", "kl_mean", "grad_norm", "ratio_mean", "reward_mean", "entropy"]
    assert all(math.isfinite(line[k]) for k in numbers), {k: line[k] for k in numbers}
    config = json.loads((tmp_path / "rl" / "run_config.json").read_text())
    assert config["ref_dtype"] == "bfloat16" and config["bf16"] and config["freeze_vision"]

    # --freeze-vision: the tower's weights are bit-identical after SFT and GRPO; the rest has moved
    start, _ = families.load_model(model_dir)
    end, _ = families.load_model(tmp_path / "rl")
    tower, rest = families.vision_parameters(start), dict(end.named_parameters())
    assert tower and all(torch.equal(a, b) for a, b in zip(tower, families.vision_parameters(end)))
    tower_ids = {id(p) for p in tower}
    moved = [n for n, p in start.named_parameters() if id(p) not in tower_ids and not torch.equal(p, rest[n])]
    assert moved, "nothing but the vision tower was trained either"


def layer_calls(model, fn) -> tuple[int, int]:
    """(runs of checkpointable layers inside the vision tower, runs outside it) while fn() runs.

    transformers checkpoints a layer's `forward`, not its `__call__` (so the layer's own hooks fire
    once), so a run is counted on the layer's first submodule, which the recompute calls again."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    inside = {id(m) for m in vision_tower(model).modules()}
    counts = [0, 0]

    def count(where):
        def hook(*_):
            counts[where] += 1
        return hook
    hooks = [next(m.children()).register_forward_hook(count(int(id(m) not in inside)))
             for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return tuple(counts)


def shared_feature_gradients(model, processor, images, completion, mask, group_size, shared_prompt=None) -> dict:
    """Parameter gradients of a log-prob loss the way the GRPO update computes them: the B images
    encoded once, completions in micro-batches of 2 rows each with its own backward, and the
    features' summed gradient sent through the vision tower once at the end. `shared_prompt` as
    in vlm.completion_logprobs (None: the model's default path)."""
    model.zero_grad(set_to_none=True)
    prompts = vlm.encode_prompts(processor, images)
    features = vlm.encode_images(model, prompts, chunked_backward=True)
    for s in range(0, completion.shape[0], 2):
        logp = vlm.completion_logprobs(model, prompts, completion[s:s + 2], mask[s:s + 2], group_size,
                                       features=features, first_row=s, shared_prompt=shared_prompt)
        (logp * mask[s:s + 2]).sum().backward()
    features.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_gradient_checkpointing_gives_the_same_gradients_through_shared_features(model_dir):
    model, processor = families.load_model(model_dir)   # float32
    model.train()
    images, g = [Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("RGB", (96, 64), (40, 40, 200))], 3
    torch.manual_seed(0)
    completion = random_completions(model, processor, len(images) * g, 5)
    mask, _ = vlm.completion_mask_from_ids(completion, vlm.eos_token_ids(model, processor))
    calls, grads = {}, {}
    for checkpointed in (False, True):
        if checkpointed:
            families.enable_activation_checkpointing(model)
        # both arms on the per-row path, so that the layer runs compare like for like: the shared-prompt
        # path runs each text layer twice per micro-batch in the forward (the prompts, then the
        # completions), as many runs as a recompute (test_shared_prompt.py checks it checkpointed)
        calls[checkpointed] = layer_calls(model, lambda: grads.__setitem__(
            checkpointed, shared_feature_gradients(model, processor, images, completion, mask, g, False)))
    # checkpointing is really on: every layer runs again in the backward, the vision tower's included
    assert calls[True][0] > calls[False][0] > 0 and calls[True][1] > calls[False][1] > 0, calls
    assert grads[True].keys() == grads[False].keys() and any(".vision" in n or "visual" in n for n in grads[True])
    for name, grad in grads[False].items():
        assert (grads[True][name] - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name


def test_frozen_vision_encodes_each_image_once_and_stays_bit_identical(model_dir, toy_data):
    """A GRPO step with docs/real_run.md's flags: the frozen tower sees the B prompts' images once per
    pass (sampling, each update; pi_old is the first update's forward), not once per completion, and does not change."""
    cfg = clgrpo.stage_config(3, model=str(model_dir), data=str(toy_data), out="", batch_size=2, num_generations=3,
                              max_new_tokens=5, micro_batch=2, logp_micro_batch=4, lr=1e-3, bf16=True,
                              ref_dtype="bfloat16", gradient_checkpointing=True, freeze_vision=True)
    model, processor = families.load_for_training(cfg, None)
    tower = [p.detach().clone() for p in families.vision_parameters(model)]
    assert tower and not any(p.requires_grad for p in families.vision_parameters(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    ref_model, _ = families.load_model(model_dir, cfg.ref_dtype)   # beta > 0: the update runs even when rewards tie
    policy = clgrpo.Policy(model, processor, ref_model.requires_grad_(False), optimizer,
                           torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1),
                           torch.autocast("cpu", dtype=torch.bfloat16))
    records, _ = read_emoset_split(toy_data, "train", limit=2)
    images = [Image.open(toy_data / r["image"]).convert("RGB") for r in records]
    once = VisionInputCounter(model)
    model(**vlm.encode_prompts(processor, images))
    once.close()
    counter = VisionInputCounter(model)
    try:
        torch.manual_seed(0)
        metrics, updates = clgrpo.grpo_step(policy, records, images, cfg)
    finally:
        counter.close()
    assert len(updates) == cfg.mu
    passes = 1 + cfg.mu      # sampling, each update (pi_old is the first update's forward)
    assert counter.rows == passes * once.rows, (counter.rows, once.rows)
    assert all(math.isfinite(u["loss"].item()) for u in updates)
    assert all(torch.equal(a, b) for a, b in zip(tower, families.vision_parameters(model)))
