"""Stage 1 SFT on COT records, and the paper's baseline SFT on plain labels.

    python sft.py --mode cot   --model INIT --data ROOT --cot cot.jsonl --out runs/stage1
    python sft.py --mode label --model INIT --data ROOT --out runs/baseline

The target is the assistant's reply: `<think>..</think><answer>..</answer>` (cot) or
`<answer>label</answer>` (label), followed by the chat template's end-of-turn token. The loss is
the mean next-token cross-entropy over those target tokens only; prompt, image and padding
tokens are labelled -100 (ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import charts
import checkpoints
import eval as evaluation
import families
import lora
import vlm
from config import add_config_flags, arg, config_from_args, float_in, int_at_least, output_path_problem, run_cli
from data import (MAX_THINK_CHARS, EpochSampler, append_jsonl, atomic_write_json, cot_target, label_target,
                  load_images, read_cot_records, read_emoset_split, read_val_for_training, truncate_jsonl_after_step)

IGNORE = -100
TARGET_SLOT = "\x00TARGET\x00"  # stands for the target while the chat template is rendered once


# ---------------------------------------------------------------------------------------------
# Batches: [pad][prompt incl. image tokens][target + end-of-turn], labels only on the target
# ---------------------------------------------------------------------------------------------
def build_sft_batch(processor, images: list, targets: list[str], padding_side: str = "left") -> dict:
    """Model inputs with `labels`: -100 on padding, prompt and image tokens; the reply's ids
    (the target, then the chat template's end-of-turn token) on the assistant's tokens.

    Each row is the chat template's own rendering of the conversation (prompt + reply, cut right
    after the end-of-turn token), tokenised by the processor in one call, so every per-token
    tensor it returns (token-type ids, multimodal token types) covers the whole row. The labels
    are that row's ids after the prompt's own ids (the generation prompt tokenised alone, as
    sampling and eval tokenise it): exactly what generation must produce after the prompt. The
    reply is never tokenised on its own: SentencePiece tokenizers (Llama / Mistral, Gemma) put a
    prefix space before text that starts a piece, so a reply tokenised alone is not the tail of
    the joint rendering. Left padding (default) puts every target at the end of its row, so only
    the last (longest target + 1) positions need logits."""
    tok = processor.tokenizer
    prompt = families.chat_prompt(processor)
    wrapper = families.assistant_reply(processor, TARGET_SLOT)  # the template around a reply is the same for all
    replies = [wrapper.replace(TARGET_SLOT, target) for target in targets]
    side, tok.padding_side = tok.padding_side, padding_side
    try:
        batch = dict(vlm.tokenize_chat(processor, images, [prompt + reply for reply in replies]))
        prompts = vlm.tokenize_chat(processor, images, [prompt] * len(images))
    finally:
        tok.padding_side = side
    eot = tok.convert_tokens_to_ids(families.end_of_turn_token(processor))
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for i, reply in enumerate(replies):
        columns = batch["attention_mask"][i].nonzero().squeeze(1)   # the row's real tokens, either padding side
        row = batch["input_ids"][i, columns]
        head = prompts["input_ids"][i][prompts["attention_mask"][i].bool()]
        if not torch.equal(row[:len(head)], head):
            raise ValueError(f"target {i}: the prompt's tokens are not a prefix of the prompt + reply's tokens "
                             f"(the tokenizer merges across the end of the prompt); reply {reply[:60]!r}")
        if len(row) == len(head) or row[-1].item() != eot:
            raise ValueError(f"target {i}: the prompt + reply does not end with the end-of-turn token "
                             f"{tok.convert_ids_to_tokens(eot)!r}; reply {reply[-60:]!r}")
        labels[i, columns[len(head):]] = row[len(head):]
    batch["labels"] = labels
    return batch


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the target tokens: -(1/|T|) sum_{t in T} log p(y_t | y_<t, image)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not vlm.uses_mrope(model):
        inputs["position_ids"] = vlm.position_ids_from_mask(inputs["attention_mask"])
    # Logits only where a target can be: the span from the first labelled column - 1 to the end.
    first = int((labels != IGNORE).float().argmax(dim=1).min())
    keep = labels.shape[1] - first + 1
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits[:, :-1]
    targets = labels[:, -(keep - 1):] if keep > 1 else labels[:, :0]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def accumulate_gradients(model, batches, grad_accum: int, autocast) -> torch.Tensor:
    """Forward and backward of each micro-batch (inputs moved to the model's device), its loss
    divided by `grad_accum` so that the summed gradients are those of the mean loss over the
    optimizer step. Returns the summed loss, detached (read once per step: one host sync)."""
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    for batch in batches:
        with autocast:
            loss = sft_loss(model, {k: v.to(device) for k, v in batch.items()}) / grad_accum
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up from 0 over `warmup` steps, then cosine decay to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_examples(cfg: SFTConfig, processor) -> list[dict]:
    """Records with their training target: COT records from --cot (validated, see
    data.read_cot_records; the model's special tokens may not appear in a target), or labels."""
    if cfg.mode == "cot":
        records, _ = read_cot_records(cfg.cot, cfg.data, cfg.max_think_chars,
                                      tuple(processor.tokenizer.all_special_tokens), cfg.skip_invalid)
        examples = [{**r, "target": cot_target(r["think"], r["answer"])} for r in records][:cfg.limit]
    else:  # the split reader applies --limit itself
        records, report = read_emoset_split(cfg.data, "train", skip_missing=cfg.skip_missing, limit=cfg.limit)
        if report["skipped_missing"]:
            print(f"skipped {report['skipped_missing']} train entries with missing images")
        examples = [{**r, "target": label_target(r["label"])} for r in records]
    if not examples:
        raise ValueError("no training examples")
    return examples


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SFTConfig:
    """Every setting of an SFT run (stage 1 on COT records, or the baseline on plain labels)."""
    mode: str = arg(help="cot: train on COT JSONL; label: <answer>label</answer>", choices=["cot", "label"])
    model: str = arg(help="initial model folder (e.g. the tiny VLM from toy.py)")
    data: str = arg(help="EmoSet-layout data root (images; labels in --mode label)")
    out: str = arg(help="run folder: checkpoint/, metrics.jsonl, run_config.json")
    cot: str | None = arg(None, "COT records JSONL from cot_builder.py (--mode cot)")
    # optimisation
    steps: int = arg(300, "optimizer steps", type=int_at_least(1))
    batch_size: int = arg(16, "examples per micro-batch", type=int_at_least(1))
    grad_accum: int = arg(1, "micro-batches per optimizer step", type=int_at_least(1))
    lr: float = arg(2e-3, "peak learning rate (2e-3 for the tiny model; ~1e-5 for 1-2B)", type=float_in(0))
    warmup: int = arg(20, "linear warm-up steps", type=int_at_least(0))
    weight_decay: float = arg(0.0, "AdamW weight decay", type=float_in(0))
    max_grad_norm: float = arg(1.0, "gradient clipping norm", type=float_in(0, lo_open=True))
    seed: int = arg(0, "seed for init-free randomness and data order")
    # data
    limit: int | None = arg(None, "use only the first N training examples", type=int_at_least(1))
    skip_missing: bool = arg(False, "skip (and count) entries whose image is missing")
    skip_invalid: bool = arg(False, "skip (and count) invalid COT records instead of stopping")
    max_think_chars: int = arg(MAX_THINK_CHARS, "longest accepted COT reasoning, in characters", type=int_at_least(1))
    # validation, checkpoints, resuming
    eval_every: int = arg(100, "validation accuracy every N steps (0: never)", type=int_at_least(0))
    eval_limit: int = arg(200, "validation records per evaluation", type=int_at_least(1))
    max_new_tokens: int = arg(96, "generation length in validation", type=int_at_least(1))
    save_every: int = arg(100, "checkpoint every N steps (and at the end)", type=int_at_least(1))
    resume: bool = arg(False, "continue from OUT/checkpoint (step, optimizer, scheduler, RNG, data order)")
    stop_after: int | None = arg(None, "save and stop after N steps of this invocation (--resume continues)",
                                 type=int_at_least(1))
    # hardware
    device: str = arg("auto", "auto, cpu or cuda")
    dtype: str = arg("float32", "weights dtype (keep float32 with --bf16 autocast)", choices=list(families.DTYPES))
    bf16: bool = arg(False, "bf16 autocast for forward/backward (GPU)")
    gradient_checkpointing: bool = arg(False, "recompute activations to save memory")
    freeze_vision: bool = arg(False, "do not train the vision tower")
    max_image_tokens: int | None = arg(None, families.IMAGE_TOKENS_HELP, type=int_at_least(1))
    # LoRA (lora.py): adapters on a frozen base; checkpoints are still saved as plain merged weights
    lora_rank: int | None = arg(None, lora.RANK_HELP, type=int_at_least(1))
    lora_alpha: float | None = arg(None, lora.ALPHA_HELP, type=float_in(0, lo_open=True))
    lora_targets: str = arg(lora.DEFAULT_TARGETS, lora.TARGETS_HELP)
    lora_vision: bool = arg(False, lora.VISION_HELP)


def parse_args(argv=None) -> SFTConfig:
    p = argparse.ArgumentParser(description="Stage 1 SFT (COT records) or the plain-label baseline.")
    add_config_flags(p, SFTConfig)
    args = p.parse_args(argv)
    if args.mode == "cot" and not getattr(args, "cot", None):
        p.error("--mode cot needs --cot FILE.jsonl")
    if problem := output_path_problem(args.out, "dir") or lora.flag_problem(args):
        p.error(problem)
    return config_from_args(SFTConfig, args)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    out, ckpt, resume = checkpoints.start_run(cfg.out, cfg.resume, cfg.seed)   # refuses an empty --resume
    model, processor = families.load_for_training(cfg, ckpt if resume else None)
    device = next(model.parameters()).device
    examples = load_examples(cfg, processor)
    val = read_val_for_training(cfg.data, cfg.eval_every, cfg.eval_limit)
    unreadable = {}   # id -> reason of images skipped (one warning each)
    params = [prm for prm in model.parameters() if prm.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    sampler = EpochSampler(len(examples), cfg.seed)
    step = 0
    if resume:
        step = checkpoints.restore_training_state(ckpt, optimizer, scheduler, sampler)["step"]
        print(f"resumed from {ckpt} at step {step}")
    out.mkdir(parents=True, exist_ok=True)
    truncate_jsonl_after_step(out / "metrics.jsonl", step)  # drop log lines of steps to be (re)done
    config = {**dataclasses.asdict(cfg), "examples": len(examples), "device": str(device)}
    atomic_write_json(out / "run_config.json", config)
    print(json.dumps(config))

    def save():
        state = checkpoints.training_state(step, optimizer, scheduler, sampler)
        checkpoints.save_checkpoint(model, processor, ckpt, trainer_state=state, extra_json={"run_config.json": config})

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"sft-{cfg.mode}")
    last = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps
    while step < last:
        t0 = time.perf_counter()

        def micro_batches():
            for _ in range(cfg.grad_accum):
                chunk, images = load_images(cfg.data, [examples[i] for i in sampler.next_batch(cfg.batch_size)],
                                            unreadable)
                if chunk:   # a draw whose images are all unreadable adds nothing
                    yield build_sft_batch(processor, images, [r["target"] for r in chunk])

        loss_sum = accumulate_gradients(model, micro_batches(), cfg.grad_accum, autocast)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        loss_value, grad_value = loss_sum.item(), grad_norm.item()  # one sync per step, also for the log
        if not math.isfinite(loss_value) or not math.isfinite(grad_value):  # check BEFORE stepping
            raise SystemExit(f"stopped at step {step + 1}: non-finite loss {loss_value} or grad norm {grad_value}; "
                             f"the last good checkpoint is {ckpt}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        try:
            checkpoints.require_finite_weights(model)
        except checkpoints.NonFiniteError as e:
            raise SystemExit(f"stopped at step {step + 1}: {e} after the optimizer step; "
                             f"the last good checkpoint is {ckpt}") from e
        step += 1
        record = {"step": step, "loss": loss_value, "grad_norm": grad_value,
                  "lr": scheduler.get_last_lr()[0], "step_s": round(time.perf_counter() - t0, 4)}
        record.update(evaluation.periodic_validation(model, processor, cfg, val, step, unreadable))
        append_jsonl(out / "metrics.jsonl", record)
        val_acc = {"val_acc": f"{record['val_accuracy']:.2f}"} if "val_accuracy" in record else {}
        bar.set_postfix(loss=f"{record['loss']:.3f}", **val_acc)
        bar.update(1)
        if step % cfg.save_every == 0 or step == last:
            save()
    bar.close()
    charts.plot_curves(out / "metrics.jsonl", out / "curves.png")
    if not (ckpt / "config.json").is_file():
        save()
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable images (named in the warnings above)")
    return {"out": str(out), "step": step, "unreadable_images": len(unreadable)}


if __name__ == "__main__":
    run_cli(main)
