"""Shared model I/O: load a VLM + processor, build chat prompts, sample groups of completions,
compute per-token log-probs of completions, save checkpoints atomically.

Works with any Hugging Face image-text-to-text checkpoint loaded from a local folder through
`AutoModelForImageTextToText` + `AutoProcessor` (the tiny toy model is Idefics3, SmolVLM's
architecture). Each prompt holds exactly one image.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import INSTRUCTION

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(path: str | os.PathLike, dtype: str = "float32", device: str = "auto",
               gradient_checkpointing: bool = False):
    """Load (model, processor) from a local folder, offline.

    The tokenizer's padding side is set to *left* after loading (it is not reliably saved):
    batched generation appends new tokens on the right, so prompts must end at the same column.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    model.to(resolve_device(device))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the cache is useless (and wasteful) in a checkpointed forward
    return model, processor


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model folder, or a training run folder whose `checkpoint/` holds the model."""
    path = Path(path)
    for candidate in (path, path / "checkpoint"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path}: not a model folder (no config.json, nor checkpoint/config.json); "
                            f"build the tiny one with `python toy.py model {path}`")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens (as generate() does), so padding is invisible."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def uses_mrope(model) -> bool:
    """Qwen2-VL-style multimodal RoPE computes its own 3-D positions from the image grid."""
    text_config = getattr(model.config, "text_config", model.config)
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    return "mrope_section" in rope


def vision_parameters(model) -> list[torch.nn.Parameter]:
    """Parameters of the vision tower (for --freeze-vision)."""
    names = ("vision_model", "vision_tower", "visual", "vision_encoder")
    return [p for n, p in model.named_parameters() if any(f".{k}." in f".{n}" for k in names)]


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def chat_prompt(processor, instruction: str = INSTRUCTION) -> str:
    """The user turn (one image + instruction) followed by the assistant's generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(processor, images: list, prompts: list[str] | str | None = None, device="cpu") -> dict:
    """Tokenise one prompt per image (left padded) and preprocess the images, as tensors on `device`."""
    if prompts is None:
        prompts = chat_prompt(processor)
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    inputs = processor(images=[[img] for img in images], text=prompts, return_tensors="pt", padding=True)
    return {k: v.to(device) for k, v in inputs.items()}


def eos_token_ids(model, processor) -> list[int]:
    """Token ids that end a completion (the chat template's end-of-turn and the model's EOS)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    tok = processor.tokenizer
    for token in (tok.eos_token, "<end_of_utterance>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        tid = tok.convert_tokens_to_ids(token) if token else None
        if tid is not None and tid != tok.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def blocked_token_ids(model, processor) -> list[int]:
    """Special tokens a completion must never contain (image placeholders, pad, BOS, ...).

    A freshly initialised (or a collapsing) model will happily sample the image placeholder, and
    the next forward then crashes because the number of image tokens no longer matches the images.
    """
    keep = set(eos_token_ids(model, processor))
    blocked = set(processor.tokenizer.all_special_ids)
    for attr in ("image_token_id", "fake_image_token_id", "video_token_id", "global_image_token_id"):
        tid = getattr(processor, attr, None)
        if isinstance(tid, int):
            blocked.add(tid)
    return sorted(blocked - keep)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, T] that keeps tokens up to and including the first EOS, and `truncated` [N].

    Tokens after the first EOS are padding from batched generation and must not count. A
    completion with no EOS was cut at max_new_tokens (truncated); its tokens all count.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # an EOS strictly before this position
    mask = (~seen_before).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


@dataclass
class Rollout:
    """B prompts x G completions, flattened example-major to N = B*G rows (row i*G+g)."""
    inputs: dict                   # prompt tensors, one row per completion
    completion_ids: torch.Tensor   # [N, T]
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    truncated: torch.Tensor        # [N] bool, no EOS within max_new_tokens
    texts: list[str]               # decoded completions (special tokens removed)


@torch.no_grad()
def sample_completions(model, processor, images: list, group_size: int = 1, max_new_tokens: int = 64,
                       temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                       prompt: str | list[str] | None = None) -> Rollout:
    """Sample `group_size` completions for each image in ONE batched generate call.

    Each example is repeated G times *before* preprocessing, so every row carries its own image.
    `prompt`: one chat prompt for all images, one per image, or None for the standard one.
    (Repeating an already flattened pixel tensor, as some GRPO code does, misaligns images and
    prompts as soon as B > 1 for processors that flatten patches, e.g. Qwen2-VL.)
    Pure temperature sampling: top_k is disabled, so the sampling distribution is exactly
    softmax(logits / temperature), the one `completion_logprobs` scores.
    """
    device = next(model.parameters()).device
    repeated = [img for img in images for _ in range(group_size)]
    if isinstance(prompt, list):
        prompt = [p for p in prompt for _ in range(group_size)]
    inputs = encode_prompts(processor, repeated, prompt, device)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                      suppress_tokens=blocked_token_ids(model, processor),
                      eos_token_id=eos_token_ids(model, processor), pad_token_id=processor.tokenizer.pad_token_id)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    sequences = model.generate(**inputs, **gen_kwargs)
    model.train(was_training)
    completion_ids = sequences[:, inputs["input_ids"].shape[1]:]
    mask, truncated = completion_mask_from_ids(completion_ids, gen_kwargs["eos_token_id"])
    texts = processor.tokenizer.batch_decode(completion_ids * mask + processor.tokenizer.pad_token_id * (1 - mask),
                                             skip_special_tokens=True)
    return Rollout(inputs, completion_ids, mask, truncated, texts)


# ---------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------
def slice_inputs(inputs: dict, start: int, end: int) -> dict:
    """Rows [start, end) of a batch of prompt tensors.

    Per-example tensors are sliced on dim 0. Processors that flatten all image patches into one
    tensor (Qwen2-VL's pixel_values [sum of patches, D] + image_grid_thw [N, 3]) are sliced by
    each example's patch count, one image per example."""
    out = {}
    n = inputs["input_ids"].shape[0]
    for key, value in inputs.items():
        if key == "pixel_values" and "image_grid_thw" in inputs:
            counts = inputs["image_grid_thw"].prod(dim=-1)
            offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
            out[key] = value[offsets[start]:offsets[end]]
        elif torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[start:end]
        else:
            out[key] = value
    return out


def _forward_completion_logits(model, inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor):
    """Logits that predict each completion token: [N, T, V]."""
    n, t = completion_ids.shape
    batch = dict(inputs)
    prompt_len = inputs["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    batch["attention_mask"] = torch.cat([inputs["attention_mask"], completion_mask.to(inputs["attention_mask"].dtype)], dim=1)
    # Every other per-token input must grow with the completion too (e.g. token-type ids).
    for key, value in inputs.items():
        if key not in ("input_ids", "attention_mask") and torch.is_tensor(value) and value.shape[:2] == (n, prompt_len):
            batch[key] = torch.cat([value, value.new_zeros(n, t)], dim=1)
    if not uses_mrope(model):
        batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    # Only the last T+1 positions' logits are needed; position P-1+j predicts completion token j.
    logits = model(**batch, use_cache=False, logits_to_keep=t + 1).logits
    return logits[:, :-1, :]


def completion_logprobs(model, inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0, micro_batch: int | None = None,
                        with_entropy: bool = False):
    """Per-token log pi(o_t | q, o_<t) of given completions, [N, T] (and entropy [N, T]).

    log-probs use softmax(logits / temperature), the distribution the tokens were sampled from.
    log p(token) = logit(token) - logsumexp(logits): this avoids materialising a full
    [N, T, V] log-softmax in the autograd graph. Entropy (a diagnostic) is computed without grad.
    Rows are processed `micro_batch` at a time when given (use it under torch.no_grad() for the
    reference / old policy; for training, micro-batch in the loop so each chunk can backward).
    """
    n = completion_ids.shape[0]
    step = micro_batch or n
    logps, entropies = [], []
    for s in range(0, n, step):
        e = min(n, s + step)
        logits = _forward_completion_logits(model, slice_inputs(inputs, s, e), completion_ids[s:e], completion_mask[s:e])
        logits = logits.float() / temperature
        ids = completion_ids[s:e].unsqueeze(-1)
        logps.append((logits.gather(-1, ids).squeeze(-1) - torch.logsumexp(logits, dim=-1)))
        if with_entropy:
            with torch.no_grad():
                logp_all = F.log_softmax(logits, dim=-1)
                entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    logp = torch.cat(logps)
    return (logp, torch.cat(entropies)) if with_entropy else logp


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def save_checkpoint(model, processor, out: str | os.PathLike, trainer_state: dict | None = None,
                    extra_json: dict | None = None) -> Path:
    """Write a checkpoint folder atomically: build it under a temporary name, then rename.

    Non-finite weights are refused before anything is written (`require_finite_weights`).
    A crash mid-save leaves the previous checkpoint untouched (and a stray temp folder that the
    next save removes). A kill between the two renames leaves the previous checkpoint as
    `.NAME.old`, which `recover_checkpoint` puts back at the next start. `trainer_state` (step,
    optimizer, scheduler, RNG...) goes to trainer_state.pt in the same folder, so weights and
    state can never disagree."""
    import json

    require_finite_weights(model)
    out = recover_checkpoint(out)
    tmp, old = _checkpoint_siblings(out)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    for name, obj in (extra_json or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    if out.exists():
        os.replace(out, old)  # keep the previous one until the new one is in place
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _checkpoint_siblings(out: Path) -> tuple[Path, Path]:
    return out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")


def recover_checkpoint(out: str | os.PathLike) -> Path:
    """Undo what an interrupted `save_checkpoint` left behind; returns `out`.

    The states a kill can leave, and what is kept:
      OUT only, or OUT + .tmp (killed while writing)      OUT; the partial .tmp is removed
      .old + .tmp, no OUT (killed between the renames)     .old goes back to OUT (the last
                                                           checkpoint that was fully in place)
      OUT + .old (killed before removing .old)             OUT; .old is removed
    """
    out = Path(out)
    tmp, old = _checkpoint_siblings(out)
    if old.exists() and not out.exists():
        os.replace(old, out)
        print(f"recovered {out} from {old.name}, left by a run killed while saving")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    return out


def resume_point(out: str | os.PathLike, resume: bool) -> Path | None:
    """The checkpoint folder to resume from (None for a fresh start), after recovering an
    interrupted save. `--resume` with no trainer state there is an error that changes nothing:
    starting fresh would silently overwrite the run's log and checkpoint."""
    ckpt = recover_checkpoint(Path(out) / "checkpoint")
    if not resume:
        return None
    if not (ckpt / "trainer_state.pt").is_file():
        raise SystemExit(f"--resume: {ckpt / 'trainer_state.pt'} not found, so there is nothing to resume; "
                         "nothing was changed. Check --out, or drop --resume to start a fresh run in that folder.")
    return ckpt


class NonFiniteError(FloatingPointError):
    """Weights (or gradients) that hold NaN or inf: training must stop, nothing may be saved."""


def require_finite_weights(model) -> None:
    """Raise NonFiniteError naming the first parameter holding NaN/inf.

    One fused reduction (torch._foreach_norm: a norm is finite iff every element is, barring an
    overflow of the sum of squares, which is then also worth stopping for) and ONE host sync,
    so it is cheap enough to run after every optimizer step."""
    params = [p.detach() for p in model.parameters()]
    if not params:
        return
    norms = torch._foreach_norm(params)
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return
    name = next(n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all()) or not torch.isfinite(p.norm()))
    raise NonFiniteError(f"non-finite weights (first: {name})")


# ---------------------------------------------------------------------------------------------
# Reproducibility: every RNG a run touches, so a resumed run continues the same random stream
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_state(step: int, optimizer, scheduler, sampler, **extra) -> dict:
    """Everything a resumed run needs besides the weights: saved as trainer_state.pt."""
    return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(), "rng": rng_state(), **extra}


def restore_training_state(ckpt: str | os.PathLike, optimizer, scheduler, sampler) -> dict:
    """Load trainer_state.pt into the optimizer, scheduler, data sampler and RNGs; return it."""
    state = torch.load(Path(ckpt) / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    return state
