"""Full-size builds of the real 1-2B checkpoints, measured: the CPU benchmark and the first GPU check.

Each model is built from its published config (written below: hidden sizes, layers, heads,
vocabulary, vision tower, image size and patch, tiles), with random weights (nothing is
downloaded), the real processor settings (tile size, image tokens per tile) and the family's
real chat template, saved, and loaded back with families.load_for_training from the flags of the
docs/real_run.md's commands. Then one SFT step and GRPO steps run through the
project's own functions (sft.build_sft_batch, sft.accumulate_gradients, clgrpo.grpo_step).
It reports parameters (vision tower / projector / language), image tokens of an EmoSet-sized
image (500 x 375), prompt tokens, memory part by part (weights, weights + gradients + AdamW after
the step, the bf16 reference) and the peaks and seconds of each phase. Each model runs in its own
process, so its peak is its own and running out of memory stops only that model.

    python scripts/full_size.py --dry-run                        # the plan: sizes, settings, estimates
    OMP_NUM_THREADS=1 python scripts/full_size.py --device cpu --models smolvlm-256m --out cpu.json
    python scripts/full_size.py --device cuda --out gpu_check.json      # the first GPU: ~10 minutes

CPU defaults: B = 2 prompts, G = 2, 16 new tokens, 1 GRPO step. CUDA defaults: docs/real_run.md's
settings, B = 8, G = 8, 256 new tokens, 3 GRPO steps (the first one includes warm-up). On the
CPU, memory is the resident set (/proc/self/status; glibc is told to return freed blocks at once,
so the resident set follows live tensors); on CUDA it is torch's allocated memory.
docs/real_run.md holds the memory plan and the measured figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

EMOSET_IMAGE = (500, 375)  # a typical EmoSet-118K image (width x height)


# ---------------------------------------------------------------------------------------------
# The published configs (config.json / preprocessor_config.json of each checkpoint)
# ---------------------------------------------------------------------------------------------
def _rope(theta: float, **extra) -> dict:
    return {"rope_type": "default", "rope_theta": theta, **extra}


def smolvlm(text: dict):
    """SmolVLM-256M/500M-Instruct (Idefics3): SigLIP-B/16 at 512 px (12 layers, 768 wide), pixel
    shuffle with scale factor 4 -> 64 tokens per 512 px crop; images split into crops of 512 px
    after resizing the longest edge to 2048 px, plus a downscaled global view; untied LM head."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    import tiny_families as tf
    tok = tf.family_tokenizer(tf.SMOLVLM_SPECIALS, listed=tf.SMOLVLM_LISTED, **tf.SMOLVLM_ROLES)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 2048},
                                                  max_image_size={"longest_edge": 512}),
        tokenizer=tok, image_seq_len=64, chat_template=tf.SMOLVLM_TEMPLATE)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=49280, max_position_embeddings=8192,
                         rope_parameters=_rope(100000.0), tie_word_embeddings=False, **text, **ids),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16),
        scale_factor=4, image_token_id=processor.image_token_id, tie_word_embeddings=False)
    return Idefics3ForConditionalGeneration, config, processor, ids


def internvl3_1b():
    """InternVL3-1B-hf: InternViT-300M (24 layers, 1024 wide, 448 px tiles, patch 14), pixel
    shuffle 0.5 -> 256 tokens per tile, up to 12 tiles + a thumbnail; Qwen2.5-0.5B language model
    (24 layers, 896 wide, 14 heads, 2 KV heads, vocabulary 151,674) with an untied LM head."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    import tiny_families as tf
    from families import image_only_class
    tok = tf.family_tokenizer(tf.INTERNVL_SPECIALS, listed=tf.INTERNVL_LISTED, extra_special_tokens=tf.INTERNVL_EXTRA,
                              **tf.QWEN_ROLES)
    processor = image_only_class(InternVLProcessor)(
        image_processor=GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                                 min_patches=1, max_patches=12),
        tokenizer=tok, image_seq_length=256, chat_template=tf.INTERNVL_TEMPLATE)
    ids = dict(bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    config = InternVLConfig(
        text_config=dict(model_type="qwen2", vocab_size=151674, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_parameters=_rope(1000000.0), tie_word_embeddings=False,
                         **ids),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=[448, 448], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
                           norm_type="layer_norm", layer_scale_init_value=0.1, use_mean_pooling=True),
        image_token_id=processor.image_token_id, downsample_ratio=0.5, image_seq_length=256,
        tie_word_embeddings=False)
    return InternVLForConditionalGeneration, config, processor, ids


def qwen2_vl_2b():
    """Qwen2-VL-2B-Instruct: a 32-block, 1280-wide ViT (patch 14, 2 x 2 merge: one token per 28 x 28
    pixels, max_pixels 12,845,056) and Qwen2-1.5B (28 layers, 1536 wide, 12 heads, 2 KV heads,
    M-RoPE [16, 24, 24], vocabulary 151,936, tied embeddings)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import tiny_families as tf
    from families import image_only_class
    tok = tf.family_tokenizer(tf.QWEN_SPECIALS, listed=tf.QWEN_LISTED, **tf.QWEN_ROLES)
    processor = image_only_class(Qwen2VLProcessor)(
        image_processor=Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                                 size={"shortest_edge": 56 * 56, "longest_edge": 12845056}),
        tokenizer=tok, chat_template=tf.QWEN2_VL_TEMPLATE)
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = dict(bos_token_id=end, eos_token_id=[tok.eos_token_id, end], pad_token_id=tok.pad_token_id)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_parameters=_rope(1000000.0, mrope_section=[16, 24, 24]), tie_word_embeddings=True,
                         bos_token_id=end, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=True, **tf._qwen_vision_ids(tok))
    return Qwen2VLForConditionalGeneration, config, processor, ids


@dataclass(frozen=True)
class Spec:
    checkpoint: str          # the published checkpoint whose config is written above
    build: object            # () -> (model class, config, processor, generation ids)
    max_image_tokens: int    # docs/real_run.md's --max-image-tokens for it
    micro_batch: int         # docs/real_run.md's --micro-batch for it
    readme_params_b: float   # the parameter count in docs/real_run.md's memory plan, in billions


MODELS = {
    "smolvlm-256m": Spec("HuggingFaceTB/SmolVLM-256M-Instruct",
                         lambda: smolvlm(dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                              num_attention_heads=9, num_key_value_heads=3)), 320, 16, 0.26),
    "smolvlm-500m": Spec("HuggingFaceTB/SmolVLM-500M-Instruct",
                         lambda: smolvlm(dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                              num_attention_heads=15, num_key_value_heads=5)), 320, 16, 0.51),
    "internvl3-1b": Spec("OpenGVLab/InternVL3-1B-hf", internvl3_1b, 768, 8, 0.94),
    "qwen2-vl-2b": Spec("Qwen/Qwen2-VL-2B-Instruct", qwen2_vl_2b, 256, 8, 2.21),
}


# ---------------------------------------------------------------------------------------------
# Sizes and the plan (no weights: the model is built on the meta device)
# ---------------------------------------------------------------------------------------------
def parameter_counts(model) -> dict:
    """Parameters of the vision tower, the projector (whatever is neither tower nor language model:
    the connector / multi-modal projector) and the language model, LM head included."""
    import families

    tower = {id(p) for p in families.vision_parameters(model)}
    counts = {"vision": 0, "projector": 0, "language": 0}
    for name, p in model.named_parameters():
        part = "vision" if id(p) in tower else "language" if ("language_model" in name or "lm_head" in name
                                                               or "text_model" in name) else "projector"
        counts[part] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def image_and_prompt_tokens(model_type: str, processor, max_image_tokens: int) -> dict:
    """Image tokens of one EmoSet-sized image, and the whole prompt's tokens, at docs/real_run.md's budget."""
    from PIL import Image

    import families
    import vlm
    budget = families.set_image_token_budget(processor, model_type, max_image_tokens)
    ids = vlm.encode_prompts(processor, [Image.new("RGB", EMOSET_IMAGE, (120, 90, 60))])["input_ids"][0]
    image_id = getattr(processor, "image_token_id", None)
    return {"budget": budget, "image_tokens": int((ids == image_id).sum()), "prompt_tokens": len(ids)}


def text_dims(config) -> dict:
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {"layers": text.num_hidden_layers, "hidden": text.hidden_size, "kv_heads": text.num_key_value_heads,
            "head_dim": head_dim, "vocab": text.vocab_size}


def estimates_gib(params: dict, dims: dict, prompt_tokens: int, s: "Settings", micro_batch: int) -> dict:
    """docs/real_run.md's memory plan, from the sizes: every figure an estimate, in GiB."""
    gib, n = 2 ** -30, s.batch_size * s.num_generations
    rows = min(micro_batch, n)
    return {
        "weights_fp32": 4 * params["total"] * gib,
        "weights_grads_adamw_fp32": 16 * params["total"] * gib,
        "reference_bf16": 2 * params["total"] * gib,
        # sampling runs outside autocast, on the float32 weights: the KV cache is float32
        "kv_cache_fp32": 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * 4 * n
                         * (prompt_tokens + s.max_new_tokens) * gib,
        "logits_fp32_one_micro_batch": rows * s.max_new_tokens * dims["vocab"] * 4 * gib,
        "checkpointed_hidden_states_bf16": dims["layers"] * rows * (prompt_tokens + s.max_new_tokens)
                                           * dims["hidden"] * 2 * gib,
    }


def model_plan(name: str, s: "Settings") -> dict:
    """Sizes, tokens and estimates of one model, built on the meta device (no memory, seconds)."""
    import torch

    spec = MODELS[name]
    cls, config, processor, _ = spec.build()
    with torch.device("meta"):
        model = cls(config)
    params = parameter_counts(model)
    tokens = image_and_prompt_tokens(config.model_type, processor, spec.max_image_tokens)
    dims = text_dims(config)
    return {"model": name, "checkpoint": spec.checkpoint, "model_type": config.model_type,
            "parameters": params, "readme_parameters_b": spec.readme_params_b, "text": dims, **tokens,
            "micro_batch": spec.micro_batch,
            "estimate_gib": {k: round(v, 3) for k, v in
                             estimates_gib(params, dims, tokens["prompt_tokens"], s, spec.micro_batch).items()}}


# ---------------------------------------------------------------------------------------------
# Measuring: memory probes, the EmoSet-sized data, one SFT step, GRPO steps
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    device: str
    batch_size: int
    num_generations: int
    max_new_tokens: int
    grpo_steps: int
    lora_rank: int | None = None   # LoRA adapters of this rank (lora.py): base frozen, no reference model


class Memory:
    """Now and peak memory in GiB: torch's allocated memory on CUDA, the resident set on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    @staticmethod
    def _status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2 ** 20
        raise KeyError(key)

    def now(self) -> float:
        import torch
        return torch.cuda.memory_allocated() / 2 ** 30 if self.cuda else self._status("VmRSS")

    def peak(self) -> float:
        import torch
        return torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else self._status("VmHWM")

    def reset_peak(self) -> None:
        import torch
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current resident set


def phase_timer(memory: Memory):
    """clgrpo.Timer that also records each phase's host peak on the CPU (the GPU peaks it records itself)."""
    import clgrpo

    class PhaseTimer(clgrpo.Timer):
        def phase(self, name):
            inner = super().phase(name)

            class Both:
                def __enter__(self_):
                    if not memory.cuda:
                        memory.reset_peak()
                    return inner.__enter__()

                def __exit__(self_, *exc):
                    out = inner.__exit__(*exc)
                    if not memory.cuda:
                        self.peak_gib[name] = max(self.peak_gib.get(name, 0.0), memory.peak())
                    return out
            return Both()
    return PhaseTimer


def write_data(root: Path, n: int) -> None:
    """An EmoSet-layout folder of n images of EmoSet's typical size (noise: the weights are random anyway)."""
    import numpy as np
    from PIL import Image

    from data import EMOTIONS
    entries, rng = [], np.random.default_rng(0)
    for i in range(n):
        label = EMOTIONS[i % len(EMOTIONS)]
        rel = f"image/{label}/{label}_{i:05d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (EMOSET_IMAGE[1], EMOSET_IMAGE[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / rel, quality=90)
        entries.append([label, f"{label}_{i:05d}", rel, f"annotation/{label}/{label}_{i:05d}.json"])
    for split in ("train", "val", "test"):
        (root / f"{split}.json").write_text(json.dumps(entries))


def build_and_save(name: str, folder: Path) -> float:
    """Random weights at full size, saved as a checkpoint folder; returns the seconds it took."""
    import torch

    import tiny_families
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cls, config, processor, ids = MODELS[name].build()
    model = cls(config)
    tiny_families.randomise_zero_weights(model)
    model.generation_config.update(**ids)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    gc.collect()
    return time.perf_counter() - t0


def readme_flags(name: str, s: Settings) -> list[str]:
    """The hardware flags of docs/real_run.md's commands ($GPU), on this run's device (and its LoRA
    variant's `--lora-rank`)."""
    lora_flags = ["--lora-rank", str(s.lora_rank)] if s.lora_rank else []
    return ["--bf16", "--gradient-checkpointing", "--device", s.device,
            "--max-image-tokens", str(MODELS[name].max_image_tokens), *lora_flags]


def cot_targets(processor, labels: list[str], tokens: int) -> list[str]:
    """COT targets whose reasoning is about `tokens` tokens long (SFT on a full-length completion)."""
    from data import cot_target
    words, think = "The dark background and the small red figures make the scene tense".split(), ""
    i = 0
    while len(processor.tokenizer(think)["input_ids"]) < tokens:
        think += ("" if not think else " ") + words[i % len(words)]
        i += 1
    return [cot_target(think, label) for label in labels]


def tensor_gib(model) -> float:
    """Bytes of the model's parameters, GiB (exact; the resident set cannot show weights that are still
    memory-mapped from the checkpoint file and not yet touched)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30


def sft_step(name: str, folder: Path, data: Path, s: Settings, memory: Memory) -> dict:
    """One SFT step (B examples) with docs/real_run.md's flags: memory part by part, seconds."""
    import torch

    import families
    import sft
    from data import load_images, read_emoset_split
    cfg = sft.parse_args(["--mode", "label", "--model", str(folder), "--data", str(data), "--out",
                          str(data.parent / "sft"), "--batch-size", str(s.batch_size), "--lr", "1e-5",
                          *readme_flags(name, s)])
    base = memory.now()
    model, processor = families.load_for_training(cfg, None)
    weights = tensor_gib(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    records, _ = read_emoset_split(data, "train", limit=s.batch_size)
    records, images = load_images(data, records, {})
    batch = sft.build_sft_batch(processor, images, cot_targets(processor, [r["label"] for r in records],
                                                               s.max_new_tokens))
    autocast = torch.autocast(torch.device(s.device).type, dtype=torch.bfloat16, enabled=cfg.bf16)
    model.train()
    memory.reset_peak()
    t0 = time.perf_counter()
    loss = sft.accumulate_gradients(model, [batch], 1, autocast).item()
    t1, peak_backward = time.perf_counter(), memory.peak()
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    if memory.cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    result = {"tokens_per_row": int(batch["attention_mask"].sum(1).max()), "loss": loss,
              "seconds": {"forward_backward": round(t1 - t0, 2), "optimizer": round(t2 - t1, 2)},
              "gib": {"weights": round(weights, 3), "weights_grads_adamw": round(memory.now() - base, 3),
                      "peak_forward_backward": round(peak_backward - base, 3),
                      "peak_step": round(memory.peak() - base, 3)}}
    del model, optimizer, params, batch
    gc.collect()
    return result


def grpo_steps(name: str, folder: Path, data: Path, s: Settings, memory: Memory) -> dict:
    """GRPO steps (stage 3) with docs/real_run.md's RL flags: memory part by part, per-phase peaks, seconds."""
    import torch

    import clgrpo
    import families
    import grpo_run
    from data import load_images, read_emoset_split
    ref_dtype = [] if s.lora_rank else ["--ref-dtype", "bfloat16"]   # with LoRA there is no reference model
    cfg = grpo_run.parse_args(["--stage", "3", "--model", str(folder), "--data", str(data), "--out",
                               str(data.parent / "rl"), *ref_dtype, "--lr", "1e-6", "--batch-size",
                               str(s.batch_size), "--num-generations", str(s.num_generations), "--max-new-tokens",
                               str(s.max_new_tokens), "--micro-batch", str(MODELS[name].micro_batch),
                               "--logp-micro-batch", "16", *readme_flags(name, s)])
    base = memory.now()
    model, processor = families.load_for_training(cfg, None)
    loaded = memory.now()
    ref_model = None   # with LoRA the reference is the policy with its adapters off (clgrpo.reference_logprobs)
    if not s.lora_rank:
        ref_model, _ = families.load_model(cfg.model, cfg.ref_dtype, cfg.device)
        ref_model.eval().requires_grad_(False)
    reference = memory.now() - loaded   # resident at once: the bf16 copy is made while loading
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    autocast = torch.autocast(torch.device(s.device).type, dtype=torch.bfloat16, enabled=cfg.bf16)
    policy = clgrpo.Policy(model, processor, ref_model, optimizer, scheduler, autocast)
    records, _ = read_emoset_split(data, "train", limit=s.batch_size)
    records, images = load_images(data, records, {})
    clgrpo.Timer = phase_timer(memory)        # per-phase host peaks on the CPU
    model.train()
    steps = []
    for _ in range(s.grpo_steps):
        memory.reset_peak()
        t0 = time.perf_counter()
        metrics, _ = clgrpo.grpo_step(policy, records, images, cfg)
        keys = [k for k in metrics if k.startswith(("time_", "mem_peak_"))]
        steps.append({"seconds": round(time.perf_counter() - t0, 2), "peak_gib": round(memory.peak() - base, 3),
                      **{k: round(metrics[k] - (base if k.startswith("mem_") else 0), 3) for k in keys},
                      "loss": metrics.get("loss"), "completion_len_mean": metrics["completion_len_mean"]})
    return {"gib": {"policy_weights": round(tensor_gib(model), 3), "reference_bf16": round(reference, 3),
                    "after_steps": round(memory.now() - base, 3)}, "steps": steps}


def measure_model(name: str, s: Settings, work: Path, out: Path) -> dict:
    """Everything this script reports about one model (run in a process of its own), written to
    `out` after each part, so that a run stopped half-way still leaves what it measured."""
    import torch

    torch.manual_seed(0)
    memory = Memory(s.device)
    record = model_plan(name, s)
    data = work / "data"
    write_data(data, max(8, s.batch_size))
    record["build_and_save_s"] = round(build_and_save(name, work / name), 1)
    record["process_gib_before"] = round(memory.now(), 3)
    for part, run in (("sft", sft_step), ("grpo", grpo_steps)):
        record[part] = run(name, work / name, data, s, memory)
        out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_in_child(name: str, s: Settings, work: Path) -> dict:
    """measure_model in a fresh process (its own peak; an out-of-memory kill stops only this model)."""
    out = work / f"{name}.json"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    argv = [sys.executable, __file__, "--child", name, "--device", s.device, "--batch-size", str(s.batch_size),
            "--num-generations", str(s.num_generations), "--max-new-tokens", str(s.max_new_tokens),
            "--grpo-steps", str(s.grpo_steps), "--work", str(work), "--out", str(out),
            *(["--lora-rank", str(s.lora_rank)] if s.lora_rank else [])]
    t0 = time.perf_counter()
    code = subprocess.call(argv, env=env)
    if code != 0 or not out.is_file():   # what it measured before it stopped, if anything
        done = json.loads(out.read_text()) if out.is_file() else {"model": name}
        return {**done, "failed": f"exit status {code} (killed for memory if -9)",
                "wall_s": round(time.perf_counter() - t0, 1)}
    return {**json.loads(out.read_text()), "wall_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------
def settings_from(args) -> Settings:
    gpu = args.device == "cuda"   # defaults: docs/real_run.md's settings on a GPU, a small step on the CPU
    return Settings(args.device, args.batch_size or (8 if gpu else 2), args.num_generations or (8 if gpu else 2),
                    args.max_new_tokens or (256 if gpu else 16), args.grpo_steps or (3 if gpu else 1), args.lora_rank)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Full-size random-weight builds of 1-2B VLMs: one SFT step and GRPO "
                                            "steps with docs/real_run.md's flags; memory and seconds per phase.")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument("--batch-size", type=int, help="prompts per step B (default: 8 on cuda, 2 on cpu)")
    p.add_argument("--num-generations", type=int, help="completions per prompt G (default: 8 on cuda, 2 on cpu)")
    p.add_argument("--max-new-tokens", type=int, help="completion length (default: 256 on cuda, 16 on cpu)")
    p.add_argument("--grpo-steps", type=int, help="GRPO steps to time (default: 3 on cuda, 1 on cpu)")
    p.add_argument("--lora-rank", type=int, help="measure the LoRA variant: adapters of this rank, no reference model")
    p.add_argument("--out", help="write the results (or the plan) as JSON to this file")
    p.add_argument("--work", help="folder for the built checkpoints (default: a temporary folder; each is GBs)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (sizes, tokens, settings, estimates) "
                                                          "without building any weights")
    p.add_argument("--child", help=argparse.SUPPRESS)   # internal: measure this one model in this process
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    s = settings_from(args)
    if args.child:
        return measure_model(args.child, s, Path(args.work), Path(args.out))
    names = args.models.split(",")
    if args.dry_run:
        result = {"dry_run": True, "settings": asdict(s), "models": [model_plan(n, s) for n in names]}
    else:
        import torch
        if s.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda: no CUDA device here (use --dry-run to see the plan)")
        with tempfile.TemporaryDirectory(dir=args.work) as work:
            result = {"settings": asdict(s), "device_name": device_name(s.device),
                      "models": [run_in_child(n, s, Path(work) / n) for n in names]}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return result


def device_name(device: str) -> str:
    import platform

    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
