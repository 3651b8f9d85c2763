"""Shared model I/O: load a VLM + processor, build chat prompts, sample groups of completions,
compute per-token log-probs of completions, save checkpoints atomically.

Works with any Hugging Face image-text-to-text checkpoint loaded from a local folder through
`AutoModelForImageTextToText` + `AutoProcessor` (the tiny toy model is Idefics3, SmolVLM's
architecture). Each prompt holds exactly one image.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lora
from data import INSTRUCTION

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(path: str | os.PathLike, dtype: str = "float32", device: str = "auto",
               gradient_checkpointing: bool = False, max_image_tokens: int | None = None):
    """Load (model, processor) from a local folder, offline.

    The tokenizer's padding side is set to *left* after loading (it is not reliably saved):
    batched generation appends new tokens on the right, so prompts must end at the same column.
    Without torchvision, a processor that has a video processor is loaded image-only (see
    `load_processor`). A folder that cannot serve as an image-text-to-text chat model fails here
    with a message naming the folder and the reason. `max_image_tokens` bounds the image tokens
    of one image through the family's own knob (set_image_token_budget).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(path)
    model_class = check_image_text_to_text(path)
    processor = load_processor(path)
    model = model_class.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    if not hasattr(model, "generate"):
        raise ValueError(f"{path}: {type(model).__name__} cannot generate text")
    if not supports_shared_features(model):
        raise ValueError(f"{path}: {type(model).__name__} does not accept precomputed image features "
                         "(mm_encoder_outputs), which the G completions of a prompt share")
    try:
        check_chat_template(processor)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if max_image_tokens is not None:
        try:
            print(f"clgrpo: {path}: image-token budget {max_image_tokens}: "
                  f"{set_image_token_budget(processor, model.config.model_type, max_image_tokens)}")
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    model.to(resolve_device(device))
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model, processor


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them (the
    `--gradient-checkpointing` flag), with torch's non-reentrant checkpoint: it supports inputs
    that need no gradient (a frozen vision tower's features) and a backward that is split in two
    (ImageFeatures.backward). transformers 5 names this activation checkpointing;
    `gradient_checkpointing_enable` is its deprecated alias."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # the cache is useless (and wasteful) in a checkpointed forward


def check_image_text_to_text(path: Path):
    """The model class AutoModelForImageTextToText maps the folder's config to, or a clear error."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"{path}: config.json cannot be read by this transformers version ({err})") from None
    mapping = AutoModelForImageTextToText._model_mapping
    if type(config) not in mapping:
        raise ValueError(f"{path}: model type {config.model_type!r} is not an image-text-to-text model "
                         f"(AutoModelForImageTextToText has no class for {type(config).__name__})")
    return mapping[type(config)]


def load_processor(path: str | os.PathLike):
    """The folder's processor, with left padding and a chat template, or a clear error.

    `AutoProcessor` builds a processor with a video processor only when torchvision imports.
    Without it (CPU machines here: the index's torchvision is a CUDA build), such a processor is
    rebuilt image-only from the folder's image processor (the PIL one), tokenizer and chat
    template, and one line says so. With torchvision installed nothing changes.
    """
    from transformers import AutoProcessor, ProcessorMixin

    path = Path(path)
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as err:
        if needs_missing_torchvision(path):  # an ImportError, or an OSError when no video config is saved
            processor = image_only_processor(path)
            print(f"clgrpo: {path}: torchvision not installed, loaded the {type(processor).__name__} processor "
                  f"image-only (no video)")
        elif isinstance(err, ImportError):  # e.g. SmolVLM's processor needs the num2words package
            raise ImportError(f"{path}: its processor needs a package that is not installed: {err}") from None
        elif isinstance(err, OSError):  # a processor part's files are missing
            raise ValueError(f"{path}: the processor cannot be loaded: {err}") from None
        else:
            raise
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{path}: {type(processor).__name__} is not an image-text processor "
                         f"(an image-text-to-text model folder needs an image processor and a tokenizer)")
    if not processor.chat_template and not getattr(processor.tokenizer, "chat_template", None):
        raise ValueError(f"{path}: the processor has no chat template (no chat_template.jinja, chat_template.json "
                         f"or tokenizer chat_template): a base, non-chat checkpoint cannot be prompted here; "
                         f"add the family's chat template to the folder")
    processor.tokenizer.padding_side = "left"
    return processor


def processor_class_name(path: Path) -> str | None:
    """`processor_class` as the folder's processor_config.json (or preprocessor_config.json) records it."""
    import json

    for name in ("processor_config.json", "preprocessor_config.json"):
        file = Path(path) / name
        if file.is_file():
            try:
                cls = json.loads(file.read_text()).get("processor_class")
            except (ValueError, AttributeError):
                return None  # unreadable: AutoProcessor's own error is the one to show
            if cls:
                return cls
    return None


def needs_missing_torchvision(path: Path) -> bool:
    """True when the folder's processor has a video processor and torchvision is not installed.

    Called only after AutoProcessor failed. Precise on purpose: torchvision must really be
    missing and the folder's processor class must take a `video_processor` argument; any other
    failure is re-raised untouched."""
    import importlib.util
    import inspect

    import transformers

    if importlib.util.find_spec("torchvision") is not None:
        return False
    cls = getattr(transformers, processor_class_name(path) or "", None)
    return cls is not None and "video_processor" in inspect.signature(cls.__init__).parameters


class MissingVideoProcessor:
    """Stands in for the video processor of an image-only processor.

    Some processors read video defaults even for image prompts (SmolVLM's apply_chat_template
    reads num_frames and fps); passing videos fails with a clear message."""
    num_frames = None
    fps = None

    def __call__(self, *args, **kwargs):
        raise RuntimeError("this processor was loaded image-only (torchvision is not installed): "
                           "it cannot process videos")


def image_only_class(cls):
    """`cls` (a processor class that takes a video processor) minus its video processor.

    transformers refuses even `video_processor=None` without torchvision (it cannot resolve the
    class to check the argument against), and `ProcessorMixin` derives a processor's parts and
    saved settings from its `__init__` signature. A subclass whose `__init__` signature is the
    original one without `video_processor` is therefore an image + text processor that behaves as
    `cls` for images and saves the same processor_config.json (it keeps the name)."""
    import inspect

    original = inspect.signature(cls.__init__)
    signature = original.replace(parameters=[p for n, p in original.parameters.items() if n != "video_processor"])
    var_keyword = [n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD]

    def __init__(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        arguments.pop("self")
        for name in var_keyword:
            arguments.update(arguments.pop(name, {}))
        cls.__init__(self, video_processor=None, **arguments)

    __init__.__signature__ = signature
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
                                        "video_processor": MissingVideoProcessor()})


def image_only_processor(path: Path):
    """Rebuild the folder's processor from its image processor, tokenizer and chat template."""
    import inspect
    import json

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    cls = getattr(transformers, processor_class_name(path))
    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # Processor-level settings (image_seq_len, num_image_tokens, ...) live in processor_config.json.
    accepted = inspect.signature(cls.__init__).parameters
    config_file = path / "processor_config.json"
    saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
    kwargs = {k: v for k, v in saved.items()
              if k in accepted and k not in ("image_processor", "tokenizer", "video_processor", "chat_template")}
    return image_only_class(cls)(image_processor=image_processor, tokenizer=tokenizer,
                                 chat_template=read_chat_template(path, tokenizer), **kwargs)


def read_chat_template(path: Path, tokenizer) -> str | None:
    """The folder's chat template: chat_template.jinja, chat_template.json, or the tokenizer's."""
    import json

    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


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
    return [p for n, p in model.named_parameters() if any(f".{k}." in f".{n}" for k in VISION_TOWERS)]


VISION_TOWERS = ("vision_model", "vision_tower", "visual", "vision_encoder")  # the tower's name, by family


IMAGE_TOKENS_HELP = ("bound one image's tokens through the family's own knob (Qwen max_pixels, SmolVLM longest "
                     "edge, InternVL tiles, LLaVA grids)")


def load_for_training(cfg, checkpoint: Path | None):
    """(model, processor) to train: from `checkpoint` when resuming, else cfg.model, with the run's
    dtype, device, gradient checkpointing and image-token budget; the vision tower frozen with
    cfg.freeze_vision (sft.py and clgrpo.py share this start). With cfg.lora_rank the base is
    always cfg.model, frozen, and a checkpoint only brings its adapters (lora.setup)."""
    lora_rank = getattr(cfg, "lora_rank", None)
    model, processor = load_model(cfg.model if lora_rank else checkpoint or cfg.model, cfg.dtype, cfg.device,
                                  cfg.gradient_checkpointing, max_image_tokens=cfg.max_image_tokens)
    if lora_rank:
        lora.setup(model, cfg, checkpoint)
    elif checkpoint is not None and (checkpoint / lora.ADAPTERS_FILE).is_file():
        raise SystemExit(f"--resume: {checkpoint} holds LoRA adapters; resume with the run's --lora-* flags")
    if cfg.freeze_vision:
        for prm in vision_parameters(model):
            prm.requires_grad_(False)
    return model, processor


# ---------------------------------------------------------------------------------------------
# What differs between model families, in one place
# ---------------------------------------------------------------------------------------------
# Everything else is read off the checkpoint: the end-of-turn token from the chat template
# (end_of_turn_token), per-token tensors by their shape, each prompt's share of the vision
# output by counting its image tokens (encode_images). What cannot be read off is how to bound
# the number of image tokens: each image processor has its own knob. The other columns are
# documentation, checked by the family tests.
@dataclass(frozen=True)
class Family:
    end_of_turn: str            # the token generation stops on (detected from the template; tested)
    per_token: tuple            # per-token tensors the processor returns besides input_ids/attention_mask
    pixels: str                 # how the processor lays out pixel tensors for one image per prompt
    knob: str                   # the image processor setting --max-image-tokens sets
    shared_prompt: bool = True  # prompt states computed once per group (prompt_states); proven in the tests


FAMILIES = {
    "idefics3": Family("<end_of_utterance>", (), "[B, crops, 3, H, W] + pixel_attention_mask",
                       "size longest_edge (crops of max_image_size) / image splitting"),
    "smolvlm": Family("<end_of_utterance>", (), "[B, crops, 3, H, W] + pixel_attention_mask",
                      "size longest_edge (crops of max_image_size) / image splitting"),
    "qwen2_vl": Family("<|im_end|>", ("mm_token_type_ids",), "[sum of patches, C*T*P*P] + image_grid_thw [B, 3]",
                       "max_pixels (size longest_edge)"),
    "qwen2_5_vl": Family("<|im_end|>", ("mm_token_type_ids",), "[sum of patches, C*T*P*P] + image_grid_thw [B, 3]",
                         "max_pixels (size longest_edge)"),
    "qwen3_vl": Family("<|im_end|>", ("mm_token_type_ids",), "[sum of patches, C*T*P*P] + image_grid_thw [B, 3]",
                       "max_pixels (size longest_edge)"),
    "internvl": Family("<|im_end|>", (), "[sum of tiles, 3, H, W] (tiles per image: count its image tokens)",
                       "max_patches (tiles; a thumbnail is added when there are several)"),
    "gemma3": Family("<end_of_turn>", ("token_type_ids",), "[B, 3, H, W] (fixed 256 tokens per image)",
                     "none: a fixed number of tokens per image (pan-and-scan off)"),
    "llava_next": Family("</s>", (), "[B, tiles, 3, H, W] + image_sizes [B, 2]", "image_grid_pinpoints"),
    "llava_onevision": Family("<|im_end|>", (), "[B, tiles, 3, H, W] + image_sizes [B, 2]", "image_grid_pinpoints"),
}


def set_image_token_budget(processor, model_type: str, max_tokens: int) -> str:
    """Bound the image tokens of one image by `max_tokens` through the family's own knob.
    Returns what was set (for the log). Raises when the family cannot go that low."""
    ip = processor.image_processor
    if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        # one token per merge x merge block of patch x patch pixels; min_pixels sets the floor
        unit = (ip.patch_size * ip.merge_size) ** 2
        _at_least(max_tokens, max(1, -(-ip.size["shortest_edge"] // unit)), model_type)
        max_pixels = max_tokens * unit
        ip.size["longest_edge"] = max_pixels
        if hasattr(ip, "max_pixels"):
            ip.max_pixels = max_pixels
        return f"max_pixels={max_pixels}"
    if model_type in ("idefics3", "smolvlm"):
        per_crop, crop = processor.image_seq_len, ip.max_image_size["longest_edge"]
        k = 0  # k x k crops of `crop` px plus the downscaled global image: (k*k + 1) * per_crop tokens
        while ((k + 1) ** 2 + 1) * per_crop <= max_tokens:
            k += 1
        _at_least(max_tokens, per_crop, model_type)
        ip.do_image_splitting = k > 0
        ip.size["longest_edge"] = max(1, k) * crop
        return f"longest_edge={ip.size['longest_edge']}, image splitting {'on' if k else 'off'}"
    if model_type == "internvl":
        per_tile = processor.image_seq_length
        _at_least(max_tokens, per_tile, model_type)
        tiles = max_tokens // per_tile - 1  # with several tiles a thumbnail tile is added
        ip.crop_to_patches = tiles >= 2
        ip.max_patches = max(1, tiles)
        ip.min_patches = min(getattr(ip, "min_patches", 1), ip.max_patches)
        return f"max_patches={ip.max_patches}, crop_to_patches={ip.crop_to_patches}"
    if model_type == "gemma3":
        _at_least(max_tokens, processor.image_seq_length, model_type)
        ip.do_pan_and_scan = False
        return f"fixed {processor.image_seq_length} tokens per image"
    if model_type in ("llava_next", "llava_onevision"):
        # A grid pinpoint (h, w) of s-px crops, q x q features per crop, costs at most
        # (h/s q)(w/s q) crop features + h/s q row ends + q^2 for the downscaled base image (+1).
        s = min(min(pp) for pp in ip.image_grid_pinpoints)
        patch = getattr(processor, "patch_size", None)
        q = s // patch if patch else math.isqrt(processor.num_image_tokens)

        def cost(pp):
            return (pp[0] // s * q) * (pp[1] // s * q) + pp[0] // s * q + q * q + 1
        fits = [pp for pp in ip.image_grid_pinpoints if cost(pp) <= max_tokens]
        if not fits:
            smallest = min(ip.image_grid_pinpoints, key=cost)
            raise ValueError(f"{model_type}: --max-image-tokens {max_tokens} is below the smallest grid "
                             f"{smallest} ({cost(smallest)} tokens)")
        ip.image_grid_pinpoints = fits
        return f"image_grid_pinpoints={fits}"
    raise ValueError(f"--max-image-tokens: no known image-token knob for model type {model_type!r}; "
                     f"known: {sorted(FAMILIES)}")


def _at_least(max_tokens: int, minimum: int, model_type: str) -> None:
    if max_tokens < minimum:
        raise ValueError(f"{model_type}: --max-image-tokens {max_tokens} is below one image's {minimum} tokens")


# ---------------------------------------------------------------------------------------------
# Prompts and the chat template
# ---------------------------------------------------------------------------------------------
def user_turn(instruction: str = INSTRUCTION) -> list[dict]:
    """The one user message of every prompt: one image, then the instruction."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def chat_prompt(processor, instruction: str = INSTRUCTION) -> str:
    """The user turn (one image + instruction) followed by the assistant's generation prompt."""
    return processor.apply_chat_template(user_turn(instruction), add_generation_prompt=True, tokenize=False)


def tokenize_chat(processor, images: list, texts: list[str]):
    """processor(images, texts): one image per text, padded on the tokenizer's side.

    Rendered chat text already holds every special token the template wants. A template that
    writes the BOS itself (Gemma, Llama) would get a second one from the tokenizer, so special
    tokens are added only when the text does not start with the BOS (what apply_chat_template
    itself does when it tokenizes)."""
    bos = processor.tokenizer.bos_token
    add_special = not (bos and texts and all(t.startswith(bos) for t in texts))
    return processor(images=[[img] for img in images], text=texts, return_tensors="pt", padding=True,
                     add_special_tokens=add_special)


def encode_prompts(processor, images: list, prompts: list[str] | str | None = None, device="cpu") -> dict:
    """Tokenise one prompt per image (left padded) and preprocess the images, as tensors on `device`."""
    if prompts is None:
        prompts = chat_prompt(processor)
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    return {k: v.to(device) for k, v in tokenize_chat(processor, images, prompts).items()}


_PROBE_TARGET = "<think>probe</think><answer>awe</answer>"


def assistant_reply(processor, target: str, instruction: str = INSTRUCTION) -> str:
    """The text the assistant must generate after the generation prompt to reply `target`.

    It is the chat template's own rendering of the conversation with that reply, minus the
    generation prompt, cut right after the end-of-turn token: what follows (a newline, an EOS)
    is never generated, so it is never trained. Raises ValueError when the template cannot
    serve as one (a family that thinks for you, or a turn that is not prompt + reply)."""
    prompt = chat_prompt(processor, instruction)
    reply_turn = {"role": "assistant", "content": [{"type": "text", "text": target}]}
    full = processor.apply_chat_template(user_turn(instruction) + [reply_turn], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template's assistant turn does not start with its own generation prompt "
                         f"(prompt ends {prompt[-30:]!r}; the conversation continues {full[len(prompt) - 30:][:60]!r})")
    reply = full[len(prompt):]
    at = reply.find(target)
    if at < 0:
        raise ValueError(f"the chat template rewrites the assistant's reply (it renders {reply[:80]!r} for "
                         f"{target[:40]!r}); templates that strip or move reasoning cannot train <think> targets")
    eot = end_of_turn_token(processor, _rendered=(reply, at + len(target)))
    return reply[:reply.find(eot, at + len(target)) + len(eot)]


def end_of_turn_token(processor, _rendered: tuple[str, int] | None = None) -> str:
    """The special token the chat template writes right after an assistant reply (<|im_end|>,
    <end_of_turn>, <end_of_utterance>, </s>...): generation must stop on it, SFT must teach it."""
    if _rendered is None:
        prompt = chat_prompt(processor)
        turn = {"role": "assistant", "content": [{"type": "text", "text": _PROBE_TARGET}]}
        full = processor.apply_chat_template(user_turn() + [turn], tokenize=False)
        reply = full[len(prompt):]
        _rendered = (reply, reply.find(_PROBE_TARGET) + len(_PROBE_TARGET))
    text, after = _rendered
    tok = processor.tokenizer
    specials = {t for t in tok.all_special_tokens} | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    found = [(text.find(t, after), t) for t in specials if t and text.find(t, after) >= 0]
    if not found:
        raise ValueError(f"the chat template ends an assistant reply with no special token ({text[after:][:40]!r}): "
                         "there is no end-of-turn token for generation to stop on")
    return min(found)[1]


def check_chat_template(processor) -> None:
    """Refuse, with the reason, a chat template this recipe cannot train through.

    The generation prompt must not open the reasoning itself (templates of "thinking" models
    append <think>): the policy must write <think> so the format reward sees what it produced.
    The assistant turn must render a <think>/<answer> reply verbatim and end with a special token."""
    prompt = chat_prompt(processor)
    if prompt.rstrip().endswith("<think>"):
        raise ValueError("the chat template opens <think> in the generation prompt (a thinking template); "
                         "use the instruct variant's template, whose generation prompt leaves the reply to the model")
    assistant_reply(processor, _PROBE_TARGET)


def eos_token_ids(model, processor) -> list[int]:
    """Token ids that end a completion: the model's EOS ids and the chat template's end-of-turn token."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    tok = processor.tokenizer
    for token in (end_of_turn_token(processor), tok.eos_token):
        tid = tok.convert_tokens_to_ids(token) if token else None
        if tid is not None and tid != tok.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def blocked_token_ids(model, processor, eos_ids: list[int] | None = None) -> list[int]:
    """Special tokens a completion must never contain (image placeholders, pad, BOS, ...), all but
    the end-of-completion ids (`eos_ids`, computed here when not given).

    A freshly initialised (or a collapsing) model will happily sample the image placeholder, and
    the next forward then crashes because the number of image tokens no longer matches the images.
    """
    keep = set(eos_ids if eos_ids is not None else eos_token_ids(model, processor))
    blocked = set(processor.tokenizer.all_special_ids)
    for attr in ("image_token_id", "fake_image_token_id", "video_token_id", "global_image_token_id",
                 "image_start_token_id", "image_end_token_id", "boi_token_id", "eoi_token_id"):
        tid = getattr(processor, attr, None)
        if isinstance(tid, int):
            blocked.add(tid)
    return sorted(blocked - keep)


# ---------------------------------------------------------------------------------------------
# Image features, computed once per pass and shared by the G completions of each prompt
# ---------------------------------------------------------------------------------------------
# The G completions of a prompt share its image. Repeating the image G times would run the
# vision tower G times on the same pixels (and hold G copies of them). Instead the B images are
# encoded once, and each completion row is given its prompt's features: transformers' VLMs take
# precomputed features through `mm_encoder_outputs` (generate() does the same internally).
@dataclass
class ImageFeatures:
    """The vision tower + projector output for B prompts (one image each)."""
    output: object                   # what get_image_features returned: pooler_output (+ deepstack_features)
    entries: list[list[int]]         # indices into pooler_output that belong to each prompt
    detached: list | None = None     # (graph tensor, leaf) pairs when chunked_backward=True

    def for_rows(self, prompt_of_row: list[int]) -> dict:
        """`mm_encoder_outputs` for rows whose prompts are `prompt_of_row` (a prompt may repeat)."""
        index = [i for p in prompt_of_row for i in self.entries[p]]
        out = copy.copy(self.output)
        out["pooler_output"] = _select(self.output["pooler_output"], index)
        if out.get("deepstack_features") is not None:  # Qwen3-VL: per-layer features, laid out like pooler_output
            out["deepstack_features"] = [_select(layer, index) for layer in self.output["deepstack_features"]]
        return {"image": out}

    def backward(self) -> None:
        """With chunked_backward: send the gradient accumulated on the features by every chunk's
        backward() through the vision tower, once (the chain rule, split at the features)."""
        pairs = [(t, leaf.grad) for t, leaf in self.detached or [] if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _select(pooled, index: list[int]):
    if torch.is_tensor(pooled):
        return pooled[torch.tensor(index, device=pooled.device)]
    return [pooled[i] for i in index]


def _map_feature_tensors(output, fn) -> None:
    """Apply fn to every tensor of pooler_output / deepstack_features, in place."""
    def apply(x):
        return fn(x) if torch.is_tensor(x) else [apply(v) for v in x]
    for key in ("pooler_output", "deepstack_features"):
        if output.get(key) is not None:
            output[key] = apply(output[key])


def image_token_id(model) -> int:
    return model.config.image_token_id


def supports_shared_features(model) -> bool:
    """Does the model accept precomputed image features (`mm_encoder_outputs`) in forward()?"""
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


def encode_images(model, prompts: dict, chunked_backward: bool = False) -> ImageFeatures:
    """Run the vision tower once on the B prompts' images.

    `chunked_backward`: the caller will run backward() once per micro-batch of completions. The
    features are then handed out as detached leaves that collect those gradients, and
    ImageFeatures.backward() sends their sum through the vision tower once at the end (the
    graph of the vision pass cannot be backpropagated several times)."""
    encoder = model.base_model.get_image_features
    wanted = inspect.signature(encoder).parameters
    output = encoder(**{k: v for k, v in prompts.items() if k in wanted}, return_dict=True)
    per_prompt = (prompts["input_ids"] == image_token_id(model)).sum(dim=1).tolist()
    entries = _entries_per_prompt([len(x) for x in output["pooler_output"]], per_prompt)
    detached = None
    if chunked_backward and torch.is_grad_enabled():
        detached = []

        def leaf(t):
            if not t.requires_grad:
                return t
            d = t.detach().requires_grad_(True)
            detached.append((t, d))
            return d
        _map_feature_tensors(output, leaf)
    return ImageFeatures(output, entries, detached)


def _entries_per_prompt(entry_tokens: list[int], prompt_tokens: list[int]) -> list[list[int]]:
    """Group the vision output's entries (images, tiles or crops) by prompt, in order, so that
    each prompt's entries hold exactly as many features as it has image placeholder tokens."""
    groups, i = [], 0
    for p, need in enumerate(prompt_tokens):
        group, have = [], 0
        while have < need and i < len(entry_tokens):
            group.append(i)
            have += entry_tokens[i]
            i += 1
        if have != need:
            raise ValueError(f"prompt {p}: {need} image tokens, but the vision output gives {have} features")
        groups.append(group)
    if i != len(entry_tokens):
        raise ValueError(f"the vision output has {len(entry_tokens) - i} entries that no prompt's image tokens use")
    return groups


def row_inputs(prompts: dict, prompt_of_row: list[int]) -> dict:
    """The prompt tensors of each completion row (no pixels: rows get image features instead).

    Every tensor with one row per prompt (input ids, masks, token-type ids, image grids, image
    sizes) is indexed by the row's prompt; pixel tensors (any layout: per prompt, flattened
    patches or tiles) are left out, they only feed the vision tower."""
    b = prompts["input_ids"].shape[0]
    index = torch.tensor(prompt_of_row, device=prompts["input_ids"].device)
    out = {}
    for key, value in prompts.items():
        if key.startswith("pixel_"):
            continue
        if not (torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == b):
            raise ValueError(f"prompt input {key!r} {tuple(getattr(value, 'shape', ()))} has no row per prompt "
                             f"({b} prompts): cannot give it to the completion rows")
        out[key] = value[index]
    return out


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
    prompts: dict                  # the B prompts' tensors (one image each), as the processor made them
    group_size: int                # G: rows i*G .. i*G+G-1 continue prompt i
    completion_ids: torch.Tensor   # [N, T]
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    truncated: torch.Tensor        # [N] bool, no EOS within max_new_tokens
    texts: list[str]               # decoded completions (special tokens removed)


@torch.no_grad()
def sample_completions(model, processor, images: list, group_size: int = 1, max_new_tokens: int = 64,
                       temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                       prompt: str | list[str] | None = None) -> Rollout:
    """Sample `group_size` completions for each image in ONE batched generate call.

    The B prompts are preprocessed once and their images encoded once; the B prompts are
    prefilled once and the G rows of each continue from its shared KV cache (prompt_states). A
    family that does not share the prompt uses generate(num_return_sequences=G), which expands
    the prompt to G rows before prefilling.
    `prompt`: one chat prompt for all images, one per image, or None for the standard one.
    Pure temperature sampling: top_k is disabled, so the sampling distribution is exactly
    softmax(logits / temperature), the one `completion_logprobs` scores.
    """
    if group_size > 1 and not do_sample:
        raise ValueError("greedy decoding gives one completion per prompt: use group_size=1")
    device = next(model.parameters()).device
    prompts = encode_prompts(processor, images, prompt, device)
    eos = eos_token_ids(model, processor)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                      num_return_sequences=group_size, suppress_tokens=blocked_token_ids(model, processor, eos),
                      eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    if shares_prompt(model):   # prefill the B prompts once, continue G rows from their shared cache
        completion_ids = _sample_from_shared_prompt(model, prompts, group_size, max_new_tokens, do_sample,
                                                    temperature, top_p, gen_kwargs["suppress_tokens"], eos,
                                                    processor.tokenizer.pad_token_id)
    else:
        sequences = model.generate(**prompts, **gen_kwargs)
        completion_ids = sequences[:, prompts["input_ids"].shape[1]:]
    model.train(was_training)
    mask, truncated = completion_mask_from_ids(completion_ids, eos)
    pad = processor.tokenizer.pad_token_id
    texts = processor.tokenizer.batch_decode(completion_ids * mask + pad * (1 - mask), skip_special_tokens=True)
    return Rollout(prompts, group_size, completion_ids, mask, truncated, texts)


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                 blocked: list[int]) -> torch.Tensor:
    """One token per row from last-position logits [N, V], as generate() picks it: blocked
    tokens to -inf, then greedy argmax, or temperature, nucleus (top-p) and a multinomial draw."""
    scores = logits.float().clone()
    if blocked:
        scores[:, blocked] = -float("inf")
    if not do_sample:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if top_p < 1.0:   # drop the least likely tokens whose total probability is at most 1 - top_p
        ordered, order = scores.sort(dim=-1)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False   # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


def _sample_from_shared_prompt(model, prompts: dict, group_size: int, max_new_tokens: int, do_sample: bool,
                               temperature: float, top_p: float, blocked: list[int], eos: list[int],
                               pad: int) -> torch.Tensor:
    """Completion ids [B*G, T]: the B prompts run once (prompt_states), each of the G rows of a
    prompt starts from its cache and adds one token per step. A finished row (it sampled an EOS)
    gets `pad` from then on; the loop stops when every row has finished or at max_new_tokens."""
    b = prompts["input_ids"].shape[0]
    device = prompts["input_ids"].device
    states = prompt_states(model, prompts, encode_images(model, prompts), list(range(b)), max_new_tokens)
    index = torch.arange(b, device=device).repeat_interleave(group_size)
    logits, cache = states.last_logits[index], None
    eos_ids = torch.tensor(eos, device=device)
    done = torch.zeros(len(index), dtype=torch.bool, device=device)
    tokens = []
    for j in range(max_new_tokens):
        nxt = _next_tokens(logits, do_sample, temperature, top_p, blocked).masked_fill(done, pad)
        tokens.append(nxt)
        done |= torch.isin(nxt, eos_ids)
        if bool(done.all()) or j == max_new_tokens - 1:
            break
        mask = torch.ones(len(index), j + 1, dtype=torch.long, device=device)
        out, cache = _continue_rows(model, states, index, nxt[:, None], mask, start=j, cache=cache)
        logits = out[:, -1, :]
    return torch.stack(tokens, dim=1)


# ---------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------
def _forward_completion_logits(model, inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                               image_features: dict):
    """Logits that predict each completion token: [N, T, V], the per-row path: every row runs
    its whole prompt again (the fallback when `shares_prompt(model)` is False)."""
    n, t = completion_ids.shape
    batch = dict(inputs)
    prompt_len = inputs["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    prompt_mask = inputs["attention_mask"]
    batch["attention_mask"] = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    # Every other per-token input must grow with the completion too (token-type ids: 0 = text).
    for key, value in inputs.items():
        if key not in ("input_ids", "attention_mask") and torch.is_tensor(value) and value.shape[:2] == (n, prompt_len):
            batch[key] = torch.cat([value, value.new_zeros(n, t)], dim=1)
    if not uses_mrope(model):
        batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    # Only the last T+1 positions' logits are needed; position P-1+j predicts completion token j.
    logits = model(**batch, mm_encoder_outputs=image_features, use_cache=False, logits_to_keep=t + 1).logits
    return logits[:, :-1, :]


# ---------------------------------------------------------------------------------------------
# The prompt once per group: its keys and values are computed for B rows and shared by G rows
# ---------------------------------------------------------------------------------------------
# In a causal model a prompt token attends only to earlier tokens, so the prompt's keys and
# values (at every layer) do not depend on the completion that follows. The G completions of a
# prompt can therefore attend to ONE copy of them: the prompt runs on B rows, its cache is
# expanded to the G rows (an index, so the gradient of a shared state is the sum over its rows),
# and each completion row runs only its own tokens. This is what generation does with a KV cache.
@dataclass
class PromptStates:
    """What the completion rows of B prompts need from the prompts' forward pass."""
    cache: list                    # per layer (keys, values) [B, heads, P, d]
    last_logits: torch.Tensor      # [B, V] logits after the last prompt token: they predict completion token 0
    attention_mask: torch.Tensor   # [B, P] the prompts' mask (left padding)
    positions: torch.Tensor        # [B, M] or [3, B, M] (mrope): positions of completion tokens 0..M-1

    def for_rows(self, index: torch.Tensor):
        """A fresh DynamicCache for the rows whose prompts are `index` (a prompt repeats G times)."""
        from transformers import DynamicCache
        return DynamicCache(ddp_cache_data=[(k[index], v[index]) for k, v in self.cache])


def shares_prompt(model) -> bool:
    """Is the prompt computed once per group (prompt_states) for this model? Not for a family
    where it is not proven exact (Family.shared_prompt), nor under activation checkpointing:
    transformers' checkpointed layers drop the KV cache, so the per-row path is used there."""
    family = FAMILIES.get(model.config.model_type)
    checkpointed = model.training and getattr(model, "is_activation_checkpointing", False)
    return bool(family is None or family.shared_prompt) and not checkpointed


def _completion_positions(model, prompts: dict, length: int) -> torch.Tensor:
    """Positions of `length` completion tokens after each prompt, as the per-row path gives them:
    the next positions after the prompt's attended tokens (left padding is invisible). With
    Qwen's multimodal RoPE the 3-D positions of the prompt plus `length` text tokens come from
    the model's own get_rope_index (text positions depend only on the token types and the mask)."""
    mask = prompts["attention_mask"]
    b = mask.shape[0]
    if not uses_mrope(model):
        start = mask.long().sum(-1, keepdim=True)
        return start + torch.arange(length, device=mask.device)
    ones = mask.new_ones(b, length)
    kwargs = {k: v for k, v in prompts.items() if not k.startswith("pixel_")}
    kwargs["input_ids"] = torch.cat([prompts["input_ids"], prompts["input_ids"].new_zeros(b, length)], dim=1)
    kwargs["attention_mask"] = torch.cat([mask, ones], dim=1)
    kwargs["mm_token_type_ids"] = torch.cat([prompts["mm_token_type_ids"], ones.new_zeros(b, length)
                                             .to(prompts["mm_token_type_ids"].dtype)], dim=1)
    get_rope_index = model.base_model.get_rope_index
    wanted = inspect.signature(get_rope_index).parameters
    positions, _ = get_rope_index(**{k: v for k, v in kwargs.items() if k in wanted})
    return positions[..., -length:]


def prompt_states(model, prompts: dict, features: ImageFeatures, prompt_ids: list[int],
                  completion_len: int) -> PromptStates:
    """Run the prompts `prompt_ids` (indices into `prompts`) once, with gradients if enabled,
    and keep their per-layer keys and values, the logits after their last token and the
    positions of the `completion_len` completion tokens that will follow them."""
    from transformers import DynamicCache

    inputs = row_inputs(prompts, prompt_ids)
    batch = dict(inputs)
    if not uses_mrope(model):
        batch["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
    out = model(**batch, mm_encoder_outputs=features.for_rows(prompt_ids), past_key_values=DynamicCache(),
                use_cache=True, logits_to_keep=1)
    cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    return PromptStates(cache, out.logits[:, -1, :], inputs["attention_mask"],
                        _completion_positions(model, inputs, completion_len))


def _continue_rows(model, states: PromptStates, index: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   start: int = 0, cache=None):
    """Forward completion tokens `ids` [N, t] (completion positions start .. start+t-1) of rows
    continuing prompts `index` [N], attending to the prompts' shared states (and to `cache`, the
    rows' own cache so far, when given). `mask` [N, start+t] is the completion's mask so far.
    Returns (logits [N, t, V], the cache)."""
    cache = states.for_rows(index) if cache is None else cache
    t = ids.shape[1]
    positions = states.positions[..., start:start + t]
    positions = positions[:, index] if positions.dim() == 3 else positions[index]
    attention_mask = torch.cat([states.attention_mask[index], mask.to(states.attention_mask.dtype)], dim=1)
    out = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                use_cache=True)
    return out.logits, out.past_key_values


def _shared_prompt_logits(model, prompts: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                          features: ImageFeatures, prompt_of_row: list[int]) -> torch.Tensor:
    """Logits that predict each completion token, [N, T, V], with each distinct prompt of the
    rows run once (prompt_states): token 0 is predicted by the prompt's last logits, tokens
    1..T-1 by the rows' own forward over completion tokens 0..T-2."""
    distinct = sorted(set(prompt_of_row))
    index = torch.tensor([distinct.index(p) for p in prompt_of_row], device=completion_ids.device)
    t = completion_ids.shape[1]
    states = prompt_states(model, prompts, features, distinct, t)
    first = states.last_logits[index].unsqueeze(1)
    if t == 1:
        return first
    rest, _ = _continue_rows(model, states, index, completion_ids[:, :-1], completion_mask[:, :-1])
    return torch.cat([first, rest], dim=1)


def completion_logprobs(model, prompts: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        group_size: int = 1, temperature: float = 1.0, micro_batch: int | None = None,
                        with_entropy: bool = False, features: ImageFeatures | None = None, first_row: int = 0,
                        shared_prompt: bool | None = None):
    """Per-token log pi(o_t | q, o_<t) of given completions, [N, T] (and entropy [N, T]).

    Row r continues prompt r // group_size; `first_row` > 0 when the completions are a slice
    (rows first_row..) of a rollout. The prompts' images are encoded once (or pass
    `features` from encode_images) and shared by all rows, whatever the micro-batch. Each
    micro-batch runs each of its prompts once and its rows only over their completion tokens
    (prompt_states), unless `shared_prompt` is False (default: shares_prompt(model)).
    log-probs use softmax(logits / temperature), the distribution the tokens were sampled from.
    log p(token) = logit(token) - logsumexp(logits): this avoids materialising a full
    [N, T, V] log-softmax in the autograd graph. Entropy (a diagnostic) is computed without grad.
    Rows are processed `micro_batch` at a time when given (use it under torch.no_grad() for the
    reference / old policy; for training, micro-batch in the loop so each chunk can backward).
    """
    n = completion_ids.shape[0]
    if features is None:
        features = encode_images(model, prompts)
    if shared_prompt is None:
        shared_prompt = shares_prompt(model)
    step = micro_batch or n
    logps, entropies = [], []
    for s in range(0, n, step):
        e = min(n, s + step)
        rows = [r // group_size for r in range(first_row + s, first_row + e)]
        if shared_prompt:
            logits = _shared_prompt_logits(model, prompts, completion_ids[s:e], completion_mask[s:e], features, rows)
        else:
            logits = _forward_completion_logits(model, row_inputs(prompts, rows), completion_ids[s:e],
                                                completion_mask[s:e], features.for_rows(rows))
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
    state can never disagree. A model with LoRA adapters is saved as a plain checkpoint with
    merged weights (W + (alpha / r) B A), plus adapters.safetensors for resuming."""
    import json

    require_finite_weights(model)
    out = recover_checkpoint(out)
    tmp, old = _checkpoint_siblings(out)
    adapters = lora.lora_layers(model)   # LoRA: the weights are saved merged, the adapters alone beside them
    model.save_pretrained(tmp, state_dict=lora.merged_state_dict(model) if adapters else None)
    if adapters:
        lora.save_adapters(model, tmp / lora.ADAPTERS_FILE)
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
        raise SystemExit(f"error: --resume: {ckpt / 'trainer_state.pt'} not found, so there is nothing to resume; "
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
    name = next(n for n, p in model.named_parameters()
                if not bool(torch.isfinite(p).all()) or not torch.isfinite(p.norm()))
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
