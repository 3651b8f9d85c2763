"""The embedded default: a toy EmoSet, a tiny offline VLM, and toy teachers.

    python toy.py data OUT [--difficulty easy|demo|hard] [--seed 0]
    python toy.py model OUT [--seed 0]

Toy world. Each 64x64 image shows one *main* shape (circle, square or triangle) on a plain
background, plus, in harder settings, smaller distractor shapes of other colours. The emotion is
a fixed function of two visible attributes of the image: background brightness (bright scenes
are positive, dark ones negative, as valence is in EmoSet) and the colour of the largest shape.
The shape itself is decoration, so reasoning can mention it without it deciding anything.

The `hard` setting has its own rule, over three visible facts: the background, the colour of the
largest object, and how many objects there are (1-4, never touching). Step round the colour wheel
red -> yellow -> green -> blue -> red as many places as there are objects, starting at the
largest object's colour; the colour you land on, with the background, decides the emotion through
the same table. A one-glance classifier must learn colour, counting and the wheel from the label
alone; a reasoner that states the facts one by one only has to see them.

Toy teachers (toy_teachers.py) stand in for the 7B+ teacher VLMs of the paper: they *look at the
pixels* (not at the annotation), describe what they see in their own words, and err at their own
rates, so the COT builder's filtering and voting have real work to do.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import EMOTIONS, INSTRUCTION, SPLITS, atomic_write_json, cot_target

IMAGE_SIZE = 64
COLORS = {"red": (220, 40, 40), "yellow": (225, 205, 35), "green": (40, 175, 60), "blue": (45, 85, 225)}
SHAPES = ("circle", "square", "triangle")
# (background, colour of the largest shape) -> emotion. Bright = positive valence, dark = negative.
TOY_TABLE = {
    ("bright", "red"): "excitement", ("bright", "yellow"): "amusement",
    ("bright", "green"): "contentment", ("bright", "blue"): "awe",
    ("dark", "red"): "anger", ("dark", "yellow"): "fear",
    ("dark", "green"): "disgust", ("dark", "blue"): "sadness",
}
ATTRIBUTES_OF = {emotion: key for key, emotion in TOY_TABLE.items()}
assert sorted(TOY_TABLE.values()) == sorted(EMOTIONS)

# Difficulty knobs. `easy`: a big centred shape, clear background (a tiny model learns it in a few
# hundred SFT steps). `demo`: position/size jitter, distractors, closer brightness ranges, colour
# jitter and 5% label noise. `hard`: the counting rule, with 5% label noise.
DIFFICULTIES = {
    "easy": dict(size=(18, 22), jitter=0, distractors=(0, 0), distractor_scale=(0.3, 0.5), bright=(190, 240),
                 dark=(15, 60), color_jitter=0, label_noise=0.0),
    "demo": dict(size=(8, 15), jitter=18, distractors=(1, 3), distractor_scale=(0.4, 0.6), bright=(132, 225),
                 dark=(30, 124), color_jitter=35, label_noise=0.05),
    # The counting rule (see the module docstring). Objects never touch, so they can be counted;
    # the others are at most 0.7 of the largest one's radius, so "the largest" is unambiguous.
    "hard": dict(rule="count", size=(7, 10), objects=(1, 4), other_scale=(0.5, 0.7), bright=(140, 225),
                 dark=(30, 115), color_jitter=25, label_noise=0.05),
    # The counting rule made easy to *see*, not easy to *infer*. Every shape has a fixed size: the
    # largest one a radius of 10 px, the others 5.5 px (0.3 of its area), one shape per quadrant,
    # no two the same colour. So the largest one's colour is also the colour covering most
    # pixels, and the count can be read off the coloured area or by looking at the four quadrants
    # in turn (what the `:stepwise` teachers do). The rule, and so what a label alone says about
    # each fact, is the same as `hard`.
    "stepwise": dict(rule="count", layout="quadrants", distinct_colors=True, size=(10, 10), objects=(1, 4),
                     other_scale=(0.55, 0.55), bright=(150, 225), dark=(30, 105), color_jitter=20, label_noise=0.05),
}
DEFAULT_SPLIT_SIZES = {"train": 2000, "val": 200, "test": 400}


# ---------------------------------------------------------------------------------------------
# Drawing the toy dataset
# ---------------------------------------------------------------------------------------------
def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        s = r * 0.886  # same area as the circle of radius r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    else:  # an upward triangle, a bit larger so its area is not much below the others
        s = r * 1.35
        draw.polygon([(cx, cy - s), (cx - s, cy + s * 0.8), (cx + s, cy + s * 0.8)], fill=color)


def _jittered(rgb, amount: int, rng: random.Random):
    return tuple(int(np.clip(c + rng.randint(-amount, amount), 0, 255)) for c in rgb)


def draw_toy_example(rng: random.Random, knobs: dict) -> tuple[Image.Image, dict]:
    """Draw one image; return it with the attributes that decide its emotion."""
    background = rng.choice(("bright", "dark"))
    color = rng.choice(tuple(COLORS))
    shape = rng.choice(SHAPES)
    level = rng.randint(*knobs[background])
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (level, level, level))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(*knobs["size"])
    c = IMAGE_SIZE / 2
    cx = c + rng.uniform(-knobs["jitter"], knobs["jitter"])
    cy = c + rng.uniform(-knobs["jitter"], knobs["jitter"])
    distractors = []
    for _ in range(rng.randint(*knobs["distractors"])):
        # At most 0.65 of the main radius (~0.42 of its area), never the main colour, so
        # "the colour covering most pixels" stays a well-defined rule.
        d = dict(shape=rng.choice(SHAPES), color=rng.choice([k for k in COLORS if k != color]),
                 size=round(r * rng.uniform(*knobs["distractor_scale"]), 1),
                 center=[round(rng.uniform(6, IMAGE_SIZE - 6), 1), round(rng.uniform(6, IMAGE_SIZE - 6), 1)])
        fill = _jittered(COLORS[d["color"]], knobs["color_jitter"], rng)
        _draw_shape(draw, d["shape"], *d["center"], d["size"], fill)
        distractors.append(d)
    _draw_shape(draw, shape, cx, cy, r, _jittered(COLORS[color], knobs["color_jitter"], rng))  # on top
    attrs = dict(background=background, background_level=level, color=color, shape=shape, size=round(r, 1),
                 center=[round(cx, 1), round(cy, 1)], distractors=distractors)
    return img, attrs


COLOR_WHEEL = tuple(COLORS)  # red -> yellow -> green -> blue -> red
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


def landing_color(largest_color: str, count: int) -> str:
    """The counting rule's middle step: `count` places round the colour wheel from `largest_color`."""
    return COLOR_WHEEL[(COLOR_WHEEL.index(largest_color) + count) % len(COLOR_WHEEL)]


def counting_rule(background: str, largest_color: str, count: int) -> str:
    """The `hard` rule: the emotion of (background, landing colour) in TOY_TABLE."""
    return TOY_TABLE[(background, landing_color(largest_color, count))]


def _reach(r: float) -> float:
    """How far a shape of radius r reaches from its centre (the triangle reaches furthest)."""
    return 1.75 * r  # the triangle's base corners are 1.73 r out


def _free_layout(rng: random.Random, radii: list[float], count: int) -> list[tuple[float, float]]:
    """Shapes anywhere, by rejection sampling of a layout where no two come within 2 px."""
    while True:
        centers = []
        for r in radii:
            for _ in range(200):
                lo, hi = _reach(r) + 1, IMAGE_SIZE - _reach(r) - 1
                c = (rng.uniform(lo, hi), rng.uniform(lo, hi))
                if all(np.hypot(c[0] - o[0], c[1] - o[1]) >= _reach(r) + _reach(ro) + 2
                       for o, ro in zip(centers, radii)):
                    centers.append(c)
                    break
            else:
                break
        if len(centers) == count:
            return centers


def _quadrant_layout(rng: random.Random, radii: list[float]) -> list[tuple[float, float]]:
    """One shape per randomly chosen quadrant, near its centre, no two within 2 px of each other."""
    quarter = IMAGE_SIZE / 4
    quadrants = rng.sample(range(4), len(radii))
    while True:
        centers = [((1 + 2 * (q % 2)) * quarter + rng.uniform(-3, 3), (1 + 2 * (q // 2)) * quarter + rng.uniform(-3, 3))
                   for q in quadrants]
        if all(np.hypot(a[0] - b[0], a[1] - b[1]) >= _reach(ra) + _reach(rb) + 2
               for i, (a, ra) in enumerate(zip(centers, radii)) for b, rb in zip(centers[i + 1:], radii[i + 1:])):
            return centers


def draw_counting_example(rng: random.Random, knobs: dict) -> tuple[Image.Image, dict]:
    """Draw one counting-rule image: 1-4 shapes that never touch, the first one the largest."""
    background = rng.choice(("bright", "dark"))
    level = rng.randint(*knobs[background])
    count = rng.randint(*knobs["objects"])
    color = rng.choice(COLOR_WHEEL)
    r_main = rng.uniform(*knobs["size"])
    radii = [r_main] + [r_main * rng.uniform(*knobs["other_scale"]) for _ in range(count - 1)]
    if knobs.get("layout") == "quadrants":
        centers = _quadrant_layout(rng, radii)
    else:
        centers = _free_layout(rng, radii, count)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (level, level, level))
    draw = ImageDraw.Draw(img)
    objects = []
    others = [k for k in COLOR_WHEEL if k != color]
    if knobs.get("distinct_colors"):
        others = rng.sample(others, count - 1)
    for i, (r, (cx, cy)) in enumerate(zip(radii, centers)):
        # the others take any colour but the largest one's, so its colour is never ambiguous
        c = color if i == 0 else others[i - 1] if knobs.get("distinct_colors") else rng.choice(others)
        o = dict(shape=rng.choice(SHAPES), color=c, size=round(r, 1), center=[round(cx, 1), round(cy, 1)])
        _draw_shape(draw, o["shape"], cx, cy, r, _jittered(COLORS[c], knobs["color_jitter"], rng))
        objects.append(o)
    attrs = dict(background=background, background_level=level, color=color, shape=objects[0]["shape"],
                 size=objects[0]["size"], center=objects[0]["center"], count=count,
                 landing_color=landing_color(color, count), distractors=objects[1:])
    return img, attrs


def rule_emotion_of(attrs: dict) -> str:
    """The emotion the pixels decide, under the rule of the attributes' difficulty."""
    if "count" in attrs:
        return counting_rule(attrs["background"], attrs["color"], attrs["count"])
    return TOY_TABLE[(attrs["background"], attrs["color"])]


def write_toy_dataset(out: str | Path, difficulty: str = "easy", seed: int = 0,
                      sizes: dict | None = None) -> dict:
    """Write a toy dataset in EmoSet's layout; deterministic for a given (difficulty, seed, sizes).

    Label noise replaces a label by a random other one and is recorded in the annotation
    (`toy.rule_emotion` keeps what the pixels say), the way real datasets carry some wrong labels.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose from {', '.join(DIFFICULTIES)}")
    knobs, sizes = DIFFICULTIES[difficulty], {**DEFAULT_SPLIT_SIZES, **(sizes or {})}
    out = Path(out)
    counter = 0
    summary = {"difficulty": difficulty, "seed": seed, "splits": {}}
    for split in SPLITS:
        rng = random.Random(f"toy-emoset:{seed}:{difficulty}:{split}")  # string seeds are stable
        entries, noisy = [], 0
        for _ in range(sizes[split]):
            draw = draw_counting_example if knobs.get("rule") == "count" else draw_toy_example
            img, attrs = draw(rng, knobs)
            rule_emotion = rule_emotion_of(attrs)
            label = rule_emotion
            if rng.random() < knobs["label_noise"]:
                label = rng.choice([e for e in EMOTIONS if e != rule_emotion])
                noisy += 1
            counter += 1
            image_id = f"{label}_{counter:05d}"
            image_rel, ann_rel = f"image/{label}/{image_id}.png", f"annotation/{label}/{image_id}.json"
            (out / image_rel).parent.mkdir(parents=True, exist_ok=True)
            (out / ann_rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(out / image_rel)
            annotation = {"emotion": label, "image_id": image_id,
                          "brightness": round(attrs["background_level"] / 255, 3),
                          "object": [attrs["shape"]] + [d["shape"] for d in attrs["distractors"]],
                          "scene": "toy",
                          "toy": {**attrs, "rule_emotion": rule_emotion, "label_noise": label != rule_emotion}}
            (out / ann_rel).write_text(json.dumps(annotation) + "\n")
            entries.append([label, image_id, image_rel, ann_rel])
        atomic_write_json(out / f"{split}.json", entries)
        summary["splits"][split] = {"n": len(entries), "noisy_labels": noisy}
    atomic_write_json(out / "toy_info.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# The tiny VLM: Idefics3 (SmolVLM's architecture) with its own byte-level BPE tokenizer
# ---------------------------------------------------------------------------------------------
# Idefics3Processor looks up the row/column tokens
SPECIAL_TOKENS = (["<pad>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                   "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]  # ordinary (generatable) tokens
# SmolVLM-style chat template: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant:"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}"
    "{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>Assistant:{% endif %}"
)
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=IMAGE_SIZE, patch_size=8)
# Model sizes. `tiny` (the tests' model): 16 image tokens, each a 2x2 pixel-shuffle of 8 px
# patches. `small` (the stepwise demo's): a wider, deeper vision tower and no pixel shuffle, so the
# language model sees all 64 patches: a 16 px token cannot tell one small shape from two.
MODEL_SIZES = {
    "tiny": dict(vision=TINY_VISION, scale_factor=2),
    "small": dict(vision={**TINY_VISION, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3},
                  scale_factor=1),
}


RULES = ("colour", "count")


def tokenizer_corpus(rules: tuple[str, ...] = RULES) -> list[str]:
    """Text the tiny tokenizer is trained on: the prompt, labels and every teacher phrasing of
    the given rules ("colour": easy/demo, "count": hard)."""
    from toy_teachers import COUNT_STYLES, STYLES, reasoning_for   # here: toy_teachers imports toy

    corpus = [INSTRUCTION, "User:", "Assistant:"]
    for (background, color), emotion in TOY_TABLE.items():
        for style in STYLES:
            for shape in SHAPES:
                corpus.append(cot_target(reasoning_for(style, background, color, shape, emotion), emotion))
        corpus.append(f"<answer>{emotion}</answer>")
    for background in ("bright", "dark") if "count" in rules else ():
        for color in COLOR_WHEEL:
            for count in range(1, 5):
                emotion = counting_rule(background, color, count)
                for style in COUNT_STYLES:  # one shape each, so the demo phrasing keeps its weight in BPE
                    shape = SHAPES[(count + COLOR_WHEEL.index(color)) % len(SHAPES)]
                    corpus.append(cot_target(reasoning_for(style, background, color, shape, emotion, count), emotion))
    return corpus * 4


def build_tiny_tokenizer(vocab_size: int = 512, special_tokens: list[str] | None = None,
                         corpus: list[str] | None = None,
                         **token_kwargs):
    """A byte-level BPE tokenizer trained on the toy corpus, wrapped as a transformers fast tokenizer.

    Defaults build the tiny Idefics3 model's tokenizer. `special_tokens` (trained in first, so they
    get the lowest ids) and `token_kwargs` (bos_token=..., eos_token=..., pad_token=...,
    extra_special_tokens=...) let tests/tiny_families.py build other families' tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE: the 256-byte alphabet means any text still encodes, only less compactly.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens or SPECIAL_TOKENS,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or tokenizer_corpus(), trainer)
    if not token_kwargs:
        token_kwargs = dict(bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<pad>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **token_kwargs)
    fast.add_tokens(TAG_TOKENS)
    return fast


def build_tiny_vlm(out: str | Path, seed: int = 0, size: str = "tiny") -> dict:
    """Build, randomly initialise and save the tiny Idefics3 VLM + processor (no downloads);
    `size` is a key of MODEL_SIZES."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    vision, scale = MODEL_SIZES[size]["vision"], MODEL_SIZES[size]["scale_factor"]
    tokenizer = build_tiny_tokenizer()
    # No image splitting: one 64 px frame -> (64/8)^2 = 64 patches -> /scale_factor^2 tokens.
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                                max_image_size={"longest_edge": IMAGE_SIZE})
    image_seq_len = (IMAGE_SIZE // vision["patch_size"]) ** 2 // scale ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    config = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), tie_word_embeddings=True, **TINY_TEXT, **ids),
        vision_config=vision, scale_factor=scale, image_token_id=processor.image_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.update(**ids)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    return {"path": str(out), "parameters": n_params, "vocab_size": len(tokenizer), "image_tokens": image_seq_len}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write a toy dataset in EmoSet layout")
    d.add_argument("out", help="output folder (EmoSet layout: train.json, val.json, test.json, image/, annotation/)")
    d.add_argument("--difficulty", default="easy", choices=list(DIFFICULTIES), help="how hard the images are")
    d.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    for split, n in DEFAULT_SPLIT_SIZES.items():
        d.add_argument(f"--n-{split}", type=int, default=n, help=f"number of {split} images")
    m = sub.add_parser("model", help="build the tiny Idefics3 VLM offline")
    m.add_argument("out", help="output folder (save_pretrained layout, safetensors)")
    m.add_argument("--seed", type=int, default=0, help="initialisation seed")
    m.add_argument("--size", default="tiny", choices=list(MODEL_SIZES),
                   help="tiny: 16 image tokens (the tests' model); small: 64 image tokens, wider vision tower")
    args = p.parse_args(argv)
    if args.cmd == "data":
        sizes = {s: getattr(args, f"n_{s}") for s in SPLITS}
        print(json.dumps(write_toy_dataset(args.out, args.difficulty, args.seed, sizes)))
    else:
        print(json.dumps(build_tiny_vlm(args.out, args.seed, args.size)))


if __name__ == "__main__":
    main()
