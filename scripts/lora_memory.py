"""The GRPO memory plan per model, full fine-tuning vs LoRA, from the published configs.

    python scripts/lora_memory.py [--rank 16]

Each model is built on PyTorch's meta device (shapes, no memory, nothing downloaded) from the
hyperparameters its Hugging Face config.json publishes, typed in below. Parameters are counted
on that build, and lora.add_lora counts the adapters, so the numbers are the ones the trainer
would see. LoRA on a projection d_in -> d_out adds r (d_in + d_out) parameters; with the default
targets that is, per decoder layer,
    r * (2 (h + h) + 2 (h + kv) + 3 (h + i))      h hidden, kv = KV heads x head dim, i MLP width.
Bytes (1 GB = 1e9 B), for one GRPO step of B = 8 prompts x G = 8, 256 new tokens, micro-batch 8:
  full fine-tuning  weights + gradients + 2 AdamW moments, fp32: 16 B per parameter;
                    the frozen reference in bf16: 2 B per parameter
  LoRA              the base weights (fp32 with --dtype float32: 4 B; bf16: 2 B), no gradient,
                    no optimizer state; adapters 16 B per adapter parameter; no reference
  both              the generation KV cache (64 rows of prompt + completion, bf16), the float32
                    logits of one micro-batch and their gradient, one checkpointed bf16 hidden
                    state per layer per token of a micro-batch, and 2-4 GB of framework overhead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import families  # noqa: E402
import lora  # noqa: E402

GB = 1e9
ROWS, MICRO, NEW_TOKENS = 64, 8, 256


def published_models() -> dict:
    """name -> (model class, config, prompt tokens per image + instruction): the config.json values."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, InternVLConfig,
                              InternVLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration)

    smolvlm = Idefics3Config(   # HuggingFaceTB/SmolVLM-500M-Instruct: SmolLM2-360M + SigLIP-base-512
        text_config=dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49280, tie_word_embeddings=False),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16), scale_factor=4, tie_word_embeddings=False)
    internvl = InternVLConfig(   # OpenGVLab/InternVL3-1B-hf: Qwen2.5-0.5B + InternViT-300M
        text_config=dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151674, tie_word_embeddings=False),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=[448, 448], patch_size=[14, 14]), downsample_ratio=0.5, tie_word_embeddings=False)
    qwen2vl = Qwen2VLConfig(   # Qwen/Qwen2-VL-2B-Instruct
        text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
        vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2), tie_word_embeddings=True)
    return {"SmolVLM-500M-Instruct": (Idefics3ForConditionalGeneration, smolvlm, 400),
            "InternVL3-1B-hf": (InternVLForConditionalGeneration, internvl, 850),
            "Qwen2-VL-2B-Instruct": (Qwen2VLForConditionalGeneration, qwen2vl, 330)}


def plan(cls, config, prompt_tokens: int, rank: int) -> dict:
    """Parameter counts and the byte terms of the memory plan for one model."""
    with torch.device("meta"):
        model = cls(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in families.vision_parameters(model))
    adapters = len(lora.add_lora(model, rank))
    trained, _ = lora.count_parameters(model)
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    tokens = prompt_tokens + NEW_TOKENS
    shared = {"KV cache": text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 2 * ROWS * tokens,
              "logits (+ grad)": 2 * MICRO * NEW_TOKENS * text.vocab_size * 4,
              "activations": text.num_hidden_layers * MICRO * tokens * text.hidden_size * 2}
    return {"total": total, "vision": vision, "lora": trained, "lora_layers": adapters, "shared": shared,
            "full": {"weights + grads + AdamW": 16 * total, "reference (bf16)": 2 * total},
            "lora fp32 base": {"base weights": 4 * total, "adapters + grads + AdamW": 16 * trained},
            "lora bf16 base": {"base weights": 2 * total, "adapters + grads + AdamW": 16 * trained}}


def table(plans: dict, rank: int) -> str:
    names = list(plans)
    rows = [f"| | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]

    def row(label, fn):
        rows.append(f"| {label} | " + " | ".join(fn(plans[n]) for n in names) + " |")

    row("parameters (vision tower + rest)", lambda p: f"{p['total'] / 1e9:.2f} B ({p['vision'] / 1e9:.2f} + "
        f"{(p['total'] - p['vision']) / 1e9:.2f})")
    row("trained, full fine-tuning", lambda p: f"{p['total'] / 1e9:.2f} B")
    row(f"trained, LoRA r = {rank} (attention + MLP)", lambda p: f"{p['lora'] / 1e6:.1f} M ({p['lora_layers']} "
        f"layers, {100 * p['lora'] / p['total']:.2f}%)")
    row("optimizer state (2 AdamW moments, fp32), full / LoRA",
        lambda p: f"{8 * p['total'] / GB:.1f} GB / {8 * p['lora'] / GB:.2f} GB")
    row("full: weights + grads + AdamW, fp32; reference, bf16",
        lambda p: f"{p['full']['weights + grads + AdamW'] / GB:.1f} GB; {p['full']['reference (bf16)'] / GB:.1f} GB")
    row("LoRA: frozen base, fp32 (bf16); adapters + grads + AdamW; reference",
        lambda p: f"{p['lora fp32 base']['base weights'] / GB:.1f} ({p['lora bf16 base']['base weights'] / GB:.1f}) "
        f"GB; {p['lora fp32 base']['adapters + grads + AdamW'] / GB:.2f} GB; 0")
    row("both: KV cache + logits + activations", lambda p: " + ".join(f"{v / GB:.1f}" for v in p["shared"].values())
        + " GB")
    for label, key in (("full fine-tuning", "full"), ("LoRA, fp32 base", "lora fp32 base"),
                       ("LoRA, bf16 base (`--dtype bfloat16`)", "lora bf16 base")):
        def total(p, key=key):
            base = (sum(p[key].values()) + sum(p["shared"].values())) / GB
            return f"**{base + 2:.0f}-{base + 4:.0f} GB**"
        row(f"**peak, {label}**", total)
    return "\n".join(rows)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description="GRPO memory plan per model, full fine-tuning vs LoRA (meta-device builds)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    args = p.parse_args(argv)
    plans = {name: plan(cls, config, prompt, args.rank) for name, (cls, config, prompt) in published_models().items()}
    text = table(plans, args.rank)
    print(text)
    return text


if __name__ == "__main__":
    main()
