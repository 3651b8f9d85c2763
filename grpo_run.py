"""Running one GRPO stage (2-4): the flags, then load, resume, step, evaluate, log and save.

    python clgrpo.py --stage 2|3|4 --model INIT --data ROOT --out OUT [overrides]

clgrpo.py holds the method (the loss, the config and one step, grpo_step); this file holds the
run around it, which any trainer needs and which teaches nothing about GRPO: the policy and its
frozen reference, the optimizer, the data order, resuming a run exactly, and the JSONL logs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from tqdm import tqdm

import charts
import clgrpo
import checkpoints
import eval as evaluation
import families
import lora
from config import add_config_flags, config_from_args, output_path_problem
from data import (EpochSampler, append_jsonl, atomic_write_json, load_images, read_emoset_split, read_val_for_training,
                  truncate_jsonl_after_step)


def parse_args(argv=None) -> clgrpo.GRPOConfig:
    """The run's config: GRPOConfig's defaults, then the stage's preset, then the flags given."""
    def preset_note(name):  # "(default: 0.2; stage 4: 0.1)": the base, then the stages that replace it
        base = next(f.default for f in dataclasses.fields(clgrpo.GRPOConfig) if f.name == name)
        replaced = [f"stage {s}: {preset[name]}" for s, preset in clgrpo.STAGE_PRESETS.items() if name in preset]
        return f"{base}; {', '.join(replaced)}" if replaced else None

    p = argparse.ArgumentParser(description="Stages 2-4: GRPO (format; format+accuracy) and CLGRPO (clip-low).")
    add_config_flags(p, clgrpo.GRPOConfig, default_note=preset_note)
    args = p.parse_args(argv)
    if problem := output_path_problem(args.out, "dir") or lora.flag_problem(args):
        p.error(problem)
    try:
        return config_from_args(clgrpo.GRPOConfig, args, **clgrpo.STAGE_PRESETS[args.stage])
    except ValueError as err:
        p.error(str(err))


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    out, ckpt, resume = checkpoints.start_run(cfg.out, cfg.resume, cfg.seed)   # refuses an empty --resume

    # The policy starts from --model (or the checkpoint when resuming); the reference is always
    # --model, frozen: KL is measured against where this stage started. With LoRA that is the
    # policy with its adapters switched off (reference_logprobs), so no second model is loaded.
    model, processor = families.load_for_training(cfg, ckpt if resume else None)
    device = next(model.parameters()).device
    ref_model = None
    if cfg.beta != 0 and not cfg.lora_rank:
        ref_model, _ = families.load_model(cfg.model, cfg.ref_dtype or cfg.dtype, cfg.device)
        ref_model.eval().requires_grad_(False)

    train, report = read_emoset_split(cfg.data, "train", skip_missing=True)
    val = read_val_for_training(cfg.data, cfg.eval_every, cfg.eval_limit)
    unreadable = {}   # id -> reason of images skipped (one warning each)
    if report["skipped_missing"]:
        print(f"skipped {report['skipped_missing']} train entries with missing images")
    params = [prm for prm in model.parameters() if prm.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    policy = clgrpo.Policy(model, processor, ref_model, optimizer, scheduler,
                           torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16))
    sampler = EpochSampler(len(train), cfg.seed)
    step, skipped = 0, 0
    if resume:
        state = checkpoints.restore_training_state(ckpt, optimizer, scheduler, sampler)
        step, skipped = state["step"], state["skipped_updates"]
        print(f"resumed from {ckpt} at step {step}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "samples.jsonl"):
        truncate_jsonl_after_step(out / name, step)  # drop log lines of steps to be (re)done
    run_config = {**dataclasses.asdict(cfg), "rewards": cfg.rewards}
    atomic_write_json(out / "run_config.json", run_config)
    print("resolved configuration:", json.dumps(run_config))

    def save():
        state = checkpoints.training_state(step, optimizer, scheduler, sampler, skipped_updates=skipped)
        checkpoints.save_checkpoint(model, processor, ckpt, trainer_state=state,
                                    extra_json={"run_config.json": run_config})

    def draw_prompts():
        """The next B training prompts with readable images; dynamic sampling draws more from the same
        sampler. A draw whose images are all unreadable is passed over (the same way when resumed)."""
        for _ in range(len(train) // cfg.batch_size + 1):
            records, images = load_images(cfg.data, [train[i] for i in sampler.next_batch(cfg.batch_size)], unreadable)
            if records:
                return records, images
        raise SystemExit(f"a whole epoch of the {len(train)} training images was unreadable (see the warnings above)")

    model.train()
    last = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps
    bar = tqdm(total=cfg.steps, initial=step, desc=f"stage{cfg.stage}")
    while step < last:
        try:
            metrics, _ = clgrpo.grpo_step(policy, *draw_prompts(), cfg, draw_prompts=draw_prompts)
            checkpoints.require_finite_weights(model)   # the loss and gradient guards miss an update that overflows
        except FloatingPointError as e:
            raise SystemExit(f"stopped at step {step + 1}: {e}. The last good checkpoint is {ckpt}") from e
        step += 1
        skipped += metrics["skipped_update"]
        samples = metrics.pop("samples")
        metrics = {"step": step, **metrics, "skipped_updates_total": skipped}
        metrics.update(evaluation.periodic_validation(model, processor, cfg, val, step, unreadable))
        append_jsonl(out / "metrics.jsonl", metrics)
        if cfg.sample_every and step % cfg.sample_every == 0:
            append_jsonl(out / "samples.jsonl", {"step": step, "samples": samples})
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", acc=f"{metrics.get('reward_accuracy', 0):.2f}",
                        fmt=f"{metrics.get('reward_format', 0):.2f}", kl=f"{metrics.get('kl_mean', 0):.3f}")
        bar.update(1)
        if step % cfg.save_every == 0 or step == last:
            save()
    bar.close()
    charts.plot_curves(out / "metrics.jsonl", out / "curves.png")
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable images (named in the warnings above)")
    return {"out": str(out), "step": step, "unreadable_images": len(unreadable)}

