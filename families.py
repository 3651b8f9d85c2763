"""Loading a VLM of any supported family: the folder and chat-template checks, the family table, image-token budgets.

`load_model` (and `load_for_training`, the trainers' start) turn a local folder into (model,
processor), offline, or refuse it with the reason. What differs between families is in one
table (`FAMILIES`); the rest is read off the checkpoint, the chat template included
(`end_of_turn_token`, `assistant_reply`). Without torchvision a processor that has a video
processor is rebuilt image-only (`load_processor`).
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import lora
from data import INSTRUCTION


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_TOKENS_HELP = ("bound one image's tokens through the family's own knob (Qwen max_pixels, SmolVLM longest "
                     "edge, InternVL tiles, LLaVA grids)")


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


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model folder, or a training run folder whose `checkpoint/` holds the model."""
    path = Path(path)
    for candidate in (path, path / "checkpoint"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path}: not a model folder (no config.json, nor checkpoint/config.json); "
                            f"build the tiny one with `python toy.py model {path}`")


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


def supports_shared_features(model) -> bool:
    """Does the model accept precomputed image features (`mm_encoder_outputs`) in forward()?"""
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of storing them (the
    `--gradient-checkpointing` flag), with torch's non-reentrant checkpoint: it supports inputs
    that need no gradient (a frozen vision tower's features) and a backward that is split in two
    (ImageFeatures.backward). transformers 5 names this activation checkpointing;
    `gradient_checkpointing_enable` is its deprecated alias."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # the cache is useless (and wasteful) in a checkpointed forward


def vision_parameters(model) -> list[torch.nn.Parameter]:
    """Parameters of the vision tower (for --freeze-vision)."""
    return [p for n, p in model.named_parameters() if any(f".{k}." in f".{n}" for k in VISION_TOWERS)]


VISION_TOWERS = ("vision_model", "vision_tower", "visual", "vision_encoder")  # the tower's name, by family


# ---------------------------------------------------------------------------------------------
# What differs between model families, in one place
# ---------------------------------------------------------------------------------------------
# Everything else is read off the checkpoint: the end-of-turn token from the chat template
# (end_of_turn_token), per-token tensors by their shape, each prompt's share of the vision
# output by counting its image tokens (vlm.encode_images). What cannot be read off is how to bound
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
# The chat template: the one user turn, and what the template says about the reply
# ---------------------------------------------------------------------------------------------
def user_turn(instruction: str = INSTRUCTION) -> list[dict]:
    """The one user message of every prompt: one image, then the instruction."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def chat_prompt(processor, instruction: str = INSTRUCTION) -> str:
    """The user turn (one image + instruction) followed by the assistant's generation prompt."""
    return processor.apply_chat_template(user_turn(instruction), add_generation_prompt=True, tokenize=False)


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


# ---------------------------------------------------------------------------------------------
# The processor, and its image-only rebuild on machines without torchvision
# ---------------------------------------------------------------------------------------------
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
