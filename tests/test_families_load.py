"""Every real model family loads, renders its chat template and runs a forward pass on images of
different sizes: tiny random builds of the real architectures (tests/tiny_families.py), no torchvision."""

import hashlib
import importlib.util
import json
import shutil

import pytest
import torch
from PIL import Image

import families
from tiny_families import FAMILY_NAMES, HAS_VIDEO_PROCESSOR, IMAGE_TOKEN, QWEN3_VL_TEMPLATE, QWEN3_VL_TEMPLATE_SHA256

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
no_torchvision = pytest.mark.skipif(HAS_TORCHVISION, reason="checks the image-only load without torchvision")

# What the template puts for one image, and how the generation prompt ends (checked on the render).
IMAGE_MARK = {"idefics3": "<image>", "smolvlm2": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
              "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
              "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>", "internvl": "<IMG_CONTEXT>\n",
              "gemma3": "<start_of_image>", "llava_next": "<image>\n", "llava_onevision": "<image>\n"}
PROMPT_END = {"idefics3": "<end_of_utterance>\nAssistant:", "smolvlm2": "<end_of_utterance>\nAssistant:",
              "qwen2_vl": "<|im_end|>\n<|im_start|>assistant\n", "qwen2_5_vl": "<|im_end|>\n<|im_start|>assistant\n",
              "qwen3_vl": "<|im_end|>\n<|im_start|>assistant\n", "internvl": "<|im_end|>\n<|im_start|>assistant\n",
              "gemma3": "<end_of_turn>\n<start_of_turn>model\n", "llava_next": "Which emotion? [/INST]",
              "llava_onevision": "<|im_end|>\n<|im_start|>assistant\n"}
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which emotion?"}]}]


def needs_extras(name):
    if name == "smolvlm2":  # SmolVLMProcessor imports num2words (as it does for the real checkpoint)
        pytest.importorskip("num2words", reason="SmolVLM's processor needs the num2words package")


@pytest.fixture(scope="module")
def loaded(tiny_family_dir):
    cache = {}

    def load(name):
        if name not in cache:
            needs_extras(name)
            cache[name] = families.load_model(tiny_family_dir(name))
        return cache[name]

    return load


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_loads_without_torchvision_and_says_so_once(name, tiny_family_dir, capsys):
    needs_extras(name)
    folder = tiny_family_dir(name)
    capsys.readouterr()
    model, processor = families.load_model(folder)
    lines = [line for line in capsys.readouterr().out.splitlines() if "torchvision not installed" in line]
    if name in HAS_VIDEO_PROCESSOR and not HAS_TORCHVISION:
        assert lines == [f"clgrpo: {folder}: torchvision not installed, loaded the {type(processor).__name__} "
                         f"processor image-only (no video)"]
        assert isinstance(processor.video_processor, families.MissingVideoProcessor)
    else:
        assert lines == []
    assert processor.tokenizer.padding_side == "left"
    tok = processor.tokenizer  # the image placeholder is special, as in the real tokenizer
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN[name]) in tok.all_special_ids
    assert type(model).__name__ == json.loads((folder / "config.json").read_text())["architectures"][0]
    assert type(processor).__name__ == json.loads((folder / "processor_config.json").read_text())["processor_class"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_chat_template_renders_the_image_and_the_generation_prompt(name, loaded):
    _, processor = loaded(name)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt.count(IMAGE_MARK[name]) == 1, prompt
    assert prompt.endswith(PROMPT_END[name]), prompt
    if name == "gemma3":  # the template writes the BOS itself
        assert prompt.startswith("<bos><start_of_turn>user\n")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_forward_on_two_images_of_different_sizes(name, loaded):
    model, processor = loaded(name)
    images = [Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("RGB", (96, 64), (40, 40, 200))]
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[[img] for img in images], text=[prompt, prompt], padding=True, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(
        {"gemma3": "<image_soft_token>", "internvl": "<IMG_CONTEXT>"}.get(name, processor.image_token))
    per_row = (inputs["input_ids"] == image_id).sum(dim=1)
    assert (per_row > 0).all()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()


def to_hub_layout(folder, fast_image_processor):
    """Rewrite a folder the way the hub checkpoints (saved by transformers 4.x) are laid out:
    preprocessor_config.json naming the *Fast* (torchvision) image processor, chat_template.json."""
    saved = json.loads((folder / "processor_config.json").read_text())
    image = saved.pop("image_processor") | {"image_processor_type": fast_image_processor,
                                            "processor_class": saved["processor_class"]}
    (folder / "preprocessor_config.json").write_text(json.dumps(image))
    (folder / "processor_config.json").write_text(json.dumps(saved))
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (folder / "chat_template.jinja").unlink()
    return template


@no_torchvision
@pytest.mark.parametrize("name,fast", [("qwen3_vl", "Qwen2VLImageProcessorFast"),
                                       ("internvl", "GotOcr2ImageProcessorFast")])
def test_hub_layout_loads_image_only_with_the_pil_image_processor(name, fast, tiny_family_dir, tmp_path, capsys):
    folder = shutil.copytree(tiny_family_dir(name), tmp_path / name)
    template = to_hub_layout(folder, fast)
    _, processor = families.load_model(folder)
    assert capsys.readouterr().out.count("torchvision not installed") == 1
    assert type(processor.image_processor).__name__ == fast.replace("Fast", "Pil")
    assert processor.chat_template == template
    if name == "internvl":  # processor-level settings survive the rebuild
        assert processor.image_seq_length == 4


def test_qwen3_vl_template_is_the_pinned_one():
    assert hashlib.sha256(QWEN3_VL_TEMPLATE.encode()).hexdigest() == QWEN3_VL_TEMPLATE_SHA256


@pytest.mark.parametrize("name", ["idefics3", "qwen2_vl"])  # a processor without, and one with, a video part
def test_folder_without_chat_template_fails_at_load_naming_it(name, tiny_family_dir, tmp_path):
    folder = shutil.copytree(tiny_family_dir(name), tmp_path / f"{name}-base")
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match=f"{folder}: the processor has no chat template"):
        families.load_model(folder)


def test_text_only_folder_fails_at_load_naming_it(tiny_family_dir, tmp_path):
    from transformers import LlamaConfig

    folder = shutil.copytree(tiny_family_dir("idefics3"), tmp_path / "text-only")
    (folder / "processor_config.json").unlink()  # a causal-LM folder: a tokenizer, no image processor
    LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    with pytest.raises(ValueError, match=f"{folder}: model type 'llama' is not an image-text-to-text model"):
        families.load_model(folder)
    with pytest.raises(ValueError, match=f"{folder}: the processor cannot be loaded"):
        families.load_processor(folder)  # its tokenizer_config.json still names Idefics3Processor


@no_torchvision
def test_other_processor_errors_are_not_taken_for_missing_torchvision(tiny_family_dir, tmp_path):
    folder = shutil.copytree(tiny_family_dir("qwen2_vl"), tmp_path / "broken")
    (folder / "processor_config.json").write_text("{ not json")
    assert not families.needs_missing_torchvision(folder)
    with pytest.raises(Exception) as caught:
        families.load_model(folder)
    assert "torchvision" not in str(caught.value)
