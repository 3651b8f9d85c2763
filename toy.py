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

Toy teachers stand in for the 7B+ teacher VLMs of the paper: they *look at the pixels* (not at
the annotation), describe what they see in their own words, and err at their own rates, so the
COT builder's filtering and voting have real work to do.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import zlib
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
# Perception: what a toy teacher "sees" in the pixels
# ---------------------------------------------------------------------------------------------
def _components(mask: np.ndarray, min_pixels: int = 6) -> list[np.ndarray]:
    """4-connected components of a boolean mask (flat pixel indices), largest first; specks of
    fewer than `min_pixels` pixels are not objects."""
    h, w = mask.shape
    todo = mask.ravel().copy()
    found = []
    for start in np.flatnonzero(todo):
        if not todo[start]:
            continue
        todo[start] = False
        stack, pixels = [start], []
        while stack:
            i = stack.pop()
            pixels.append(i)
            y, x = divmod(i, w)
            for j, ok in ((i - w, y > 0), (i + w, y < h - 1), (i - 1, x > 0), (i + 1, x < w - 1)):
                if ok and todo[j]:
                    todo[j] = False
                    stack.append(j)
        if len(pixels) >= min_pixels:
            found.append(np.array(pixels))
    return sorted(found, key=len, reverse=True)


def perceive(img: Image.Image) -> dict:
    """What the pixels show: background brightness, the colour covering most pixels and a guess
    of its shape (the demo rule's facts), the number of separate objects and the colour of the
    largest one (the counting rule's facts).

    Unsaturated pixels are background; saturated ones are assigned to the nearest colour
    prototype. The shape is guessed from how much of its bounding box the largest colour fills
    (square ~1.0, circle ~0.79, triangle ~0.5). Objects are 4-connected groups of saturated
    pixels (the `hard` images never let two objects touch)."""
    a = np.asarray(img.convert("RGB"), dtype=np.int32)
    saturation = a.max(-1) - a.min(-1)
    is_object = saturation > 60
    bg = a[~is_object].mean() if (~is_object).any() else 128.0
    background = "bright" if bg >= 128 else "dark"
    protos = np.array(list(COLORS.values()))
    obj = a[is_object]
    if len(obj) == 0:
        return {"background": background, "color": None, "shape": None, "count": 0, "largest_color": None,
                "quadrants": [None] * 4, "largest_quadrant": None}
    nearest = ((obj[:, None, :] - protos[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(protos))
    winner = int(counts.argmax())
    # shape: fill ratio of the winning colour inside its bounding box
    mask = np.zeros(a.shape[:2], dtype=bool)
    mask[is_object] = nearest == winner
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / max(1, (np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    objects = _components(is_object)
    label_of = np.full(a.shape[:2], -1).ravel()
    label_of[np.flatnonzero(is_object)] = nearest
    colors = [list(COLORS)[int(np.bincount(label_of[o], minlength=len(protos)).argmax())] for o in objects]
    quadrants, largest_quadrant = [None] * 4, None   # reading order: top left, top right, bottom left, bottom right
    for k, (o, c) in enumerate(zip(objects, colors)):
        y, x = np.divmod(o, a.shape[1])
        q = 2 * int(y.mean() >= a.shape[0] / 2) + int(x.mean() >= a.shape[1] / 2)
        quadrants[q] = quadrants[q] or c
        largest_quadrant = q if k == 0 else largest_quadrant
    return {"background": background, "color": list(COLORS)[winner], "shape": shape, "count": len(objects),
            "largest_color": colors[0] if colors else None, "quadrants": quadrants,
            "largest_quadrant": largest_quadrant}


# ---------------------------------------------------------------------------------------------
# Toy teachers (see teachers.py for the interface they serve)
# ---------------------------------------------------------------------------------------------
BRIGHT_WORDS = {"bright": "bright", "light": "bright", "sunny": "bright",
                "dark": "dark", "dim": "dark", "gloomy": "dark"}
STYLES = {
    "describer": ("The background is {bg_word} and the largest object is a {color} {shape}. "
                  "A {bg_word} scene with a dominant {color} object suggests {emotion}."),
    "counter": ("I see a {color} {shape} covering most of the coloured pixels, set against a {bg_word} backdrop. "
                "{valence} mood from the {bg_word} tone, and {color} points to {emotion}."),
    "terse": "{bg_word} background, {color} {shape}. So {emotion}.",
}
# The counting rule's reasoning states every fact it uses (background, largest colour, count) and
# the step that combines them, so a student that imitates it is told what to look at.
COUNT_STYLES = {
    "describer": ("The background is {bg_word}. The largest object is a {color} {shape}. I count {count_word} objects. "
                  "{count_cap} steps from {color} is {landing}. A {bg_word} scene with {landing} suggests {emotion}."),
    "counter": ("Counting the shapes: {count_word}. The biggest is {color}, on a {bg_word} backdrop. "
                "{color} plus {count} is {landing}, and {landing} in a {valence} mood means {emotion}."),
    "terse": "{bg_word} background, {color} largest, count {count}, so {landing}. So {emotion}.",
}
# The stepwise teachers go round the quadrants first, naming what each one holds, then state the
# count, the largest shape's colour and the emotion. Two lessons of docs/experiments.md are built
# in: every colour they name is a colour in the image (no landing colour: a colour word that is
# not in the image taught the student to stop reading colours), and the count is reached by
# looking at four places one by one instead of at a glance (a glance did not teach it to count).
QUADRANT_NAMES = ("top left", "top right", "bottom left", "bottom right")
STEPWISE_STYLES = {
    "describer": ("The background is {bg_word}. {quadrants}. That makes {count_word} objects, and the largest "
                  "is {color}. A {bg_word} scene, {color} and {count_word} suggest {emotion}."),
    "counter": ("Going round: {quadrants}. Counting the shapes: {count_word}. The biggest is {color}, on a "
                "{bg_word} backdrop. {color} plus {count} in a {valence} mood means {emotion}."),
    "terse": "{bg_word} background. {quadrants}: count {count}, {color} largest. So {emotion}.",
}
# The wheel teachers (`:wheel`) write the stepwise reasoning and then the wheel step itself, in
# numbers, never in colour words (lesson 1 above): the largest colour's place on the wheel
# (red 1, yellow 2, green 3, blue 4), that place plus the count, round the wheel, and the emotion
# of the background at the place it lands on. Each step joins two facts that sit side by side in
# the text, so the student never has to compose three far-apart facts in one go.
WHEEL_STYLES = {
    "describer": ("The background is {bg_word}. {quadrants}. That makes {count_word} objects, and the largest "
                  "is {color}. On the wheel {color} is {place}, and {place} plus {count} comes round to "
                  "{landing_place}. A {bg_word} scene at {landing_place} suggests {emotion}."),
    "counter": ("Going round: {quadrants}. Counting the shapes: {count_word}. The biggest is {color}, on a "
                "{bg_word} backdrop. {color} is {place} on the wheel, {place} plus {count} is {landing_place}, "
                "and {landing_place} in a {valence} mood means {emotion}."),
    "terse": ("{bg_word} background. {quadrants}: count {count}, {color} largest. Wheel {place} plus {count} "
              "is {landing_place}. {bg_word} at {landing_place}: {emotion}."),
}
LISTING_STYLES = (STEPWISE_STYLES, WHEEL_STYLES)   # the phrasings that go round the quadrants
BG_WORDS = {"describer": ("bright", "dark"), "counter": ("light", "dim"), "terse": ("sunny", "gloomy")}
NUMBER_WORDS = {**{w: n for n, w in enumerate(COUNT_WORDS)}, **{str(n): n for n in range(len(COUNT_WORDS))}}


def reasoning_for(style: str, background: str, color: str, shape: str | None, emotion: str,
                  count: int | None = None, styles: dict | None = None, quadrants: list | None = None) -> str:
    """A teacher's reasoning in its own words: the demo rule's facts, or with `count` the
    counting rule's, phrased by `styles`: COUNT_STYLES, which name the landing colour that follows
    from colour and count, STEPWISE_STYLES, which list what each quadrant holds (`quadrants`:
    a colour or None each, in QUADRANT_NAMES order) and name no landing colour, or WHEEL_STYLES,
    which then also write the wheel step in numbers."""
    bg_word = BG_WORDS[style][0 if background == "bright" else 1]
    valence = "Positive" if background == "bright" else "Negative"
    if count is None:
        return STYLES[style].format(bg_word=bg_word, color=color, shape=shape or "shape", emotion=emotion,
                                    valence=valence)
    listing = ", ".join(f"{name} {c or 'empty'}" for name, c in zip(QUADRANT_NAMES, quadrants or [None] * 4))
    if style == "describer":
        listing = listing[0].upper() + listing[1:]
    place = COLOR_WHEEL.index(color) + 1   # counted from 1, as a person would
    return (styles or COUNT_STYLES)[style].format(
        bg_word=bg_word, color=color, shape=shape or "shape", emotion=emotion, quadrants=listing,
        valence=valence.lower(), count=count, count_word=COUNT_WORDS[count], count_cap=COUNT_WORDS[count].capitalize(),
        landing=landing_color(color, count), place=place, landing_place=(place - 1 + count) % len(COLOR_WHEEL) + 1)


def _words(text: str) -> list[str]:
    return text.lower().replace(",", " ").replace(".", " ").replace(":", " ").split()


def attributes_from_text(text: str) -> tuple[str | None, str | None]:
    """Read (background, colour) back from any teacher's reasoning text (first mention wins)."""
    words = _words(text)
    background = next((BRIGHT_WORDS[w] for w in words if w in BRIGHT_WORDS), None)
    color = next((w for w in words if w in COLORS), None)
    return background, color


def quadrants_from_text(text: str) -> list[str | None] | None:
    """What a stepwise reasoning says each quadrant holds (a colour or None), or None if it does
    not go round all four."""
    found = [re.search(rf"{name}:? (\w+)", text, re.IGNORECASE) for name in QUADRANT_NAMES]
    if not all(found):
        return None
    return [m.group(1).lower() if m.group(1).lower() in COLORS else None for m in found]


def facts_from_text(text: str) -> tuple[str | None, str | None, int | None]:
    """Read (background, largest colour, count) back from counting-rule reasoning (first mention
    of each wins, once a stepwise quadrant listing is taken out; the landing colour comes after
    the largest one in every style)."""
    text = re.sub(rf"({'|'.join(QUADRANT_NAMES)}):? \w+", " ", text, flags=re.IGNORECASE)
    background, color = attributes_from_text(text)
    count = next((NUMBER_WORDS[w] for w in _words(text) if w in NUMBER_WORDS), None)
    return background, color, count


RULES = ("colour", "count")


class ToyTeacher:
    """A pixel-reading stand-in for a 7B+ teacher VLM.

    `name` is a style (describer, counter, terse), optionally followed by `:hard` for the
    counting rule of `toy.py data --difficulty hard` (cot_builder's `toy:describer:hard`), or by
    `:stepwise` for the same rule phrased without the landing colour (STEPWISE_STYLES), or by
    `:wheel` for stepwise reasoning that also writes the wheel step in numbers (WHEEL_STYLES).
    `error_rate`: chance of misperceiving one fact (hence a wrong, but self-consistent, answer);
    `malformed_rate`: chance of a reply without the required tags. Errors are a deterministic
    function of (teacher, image id, call kind) so reruns and resumes agree."""

    def __init__(self, name: str, style: str | None = None, error_rate: float | None = None,
                 malformed_rate: float = 0.02, seed: int = 0):
        presets = {"describer": 0.10, "counter": 0.20, "terse": 0.35}
        base, _, variant = name.partition(":")
        if variant not in ("", "hard", "stepwise", "wheel"):
            raise ValueError(f"toy teacher {name!r}: expected NAME, NAME:hard, NAME:stepwise or NAME:wheel")
        self.rule = "count" if variant else "colour"
        self.count_styles = {"stepwise": STEPWISE_STYLES, "wheel": WHEEL_STYLES}.get(variant, COUNT_STYLES)
        self.name = f"toy:{name}"
        self.style = style or (base if base in STYLES else "describer")
        self.error_rate = presets.get(base, 0.2) if error_rate is None else error_rate
        self.malformed_rate = malformed_rate
        self.seed = seed

    def _rng(self, key: str) -> random.Random:
        return random.Random(zlib.crc32(f"{self.name}:{self.seed}:{key}".encode()))

    def _maybe_err(self, rng: random.Random, background: str, color: str | None, count: int | None = None):
        """With probability error_rate, misperceive one fact: the background, the colour or
        (counting rule) the count, off by one."""
        if rng.random() < self.error_rate:
            # (the two-fact draw is the one the demo's COT data was built with; keep it)
            fact = (0 if rng.random() < 0.5 else 1) if count is None else rng.randrange(3)
            if fact == 0:
                background = "dark" if background == "bright" else "bright"
            elif fact == 1:
                color = rng.choice([c for c in COLORS if c != color])
            else:
                count = count + 1 if count <= 1 or (count < 4 and rng.random() < 0.5) else count - 1
        return background, color, count

    def _facts(self, rng: random.Random, img: Image.Image):
        """(background, colour, count or None, shape, quadrants) as this teacher sees them, errors
        included; the quadrant listing is kept consistent with the (mis)read colour and count."""
        seen = perceive(img)
        if self.rule == "count":
            color = seen["largest_color"] or rng.choice(list(COLORS))
            background, color, count = self._maybe_err(rng, seen["background"], color, max(1, seen["count"]))
        else:
            color = seen["color"] or rng.choice(list(COLORS))
            background, color, count = self._maybe_err(rng, seen["background"], color)
        listing = self.count_styles in LISTING_STYLES   # (only they list quadrants; others draw no more)
        return background, color, count, seen["shape"], self._listing(rng, seen, color, count) if listing else None

    @staticmethod
    def _listing(rng: random.Random, seen: dict, color: str, count: int | None) -> list:
        """The quadrants as reported: the largest shape's quadrant shows `color`; a count misread
        by one adds a shape to an empty quadrant or leaves out one of the smaller ones."""
        quadrants, largest = list(seen["quadrants"]), seen["largest_quadrant"]
        if largest is None:
            largest = rng.randrange(4)
        quadrants[largest] = color
        while count is not None and sum(q is not None for q in quadrants) < count:
            empty = [i for i, q in enumerate(quadrants) if q is None]
            quadrants[rng.choice(empty)] = rng.choice([c for c in COLORS if c != color])
        while count is not None and sum(q is not None for q in quadrants) > count:
            quadrants[rng.choice([i for i, q in enumerate(quadrants) if q is not None and i != largest])] = None
        return quadrants

    def _emotion(self, background: str, color: str, count: int | None) -> str:
        return TOY_TABLE[(background, color)] if count is None else counting_rule(background, color, count)

    def blind(self, items: list[tuple[str, Image.Image]]) -> list[str]:
        """COT answers for (id, image) pairs, without seeing the labels."""
        replies = []
        for image_id, img in items:
            rng = self._rng(f"blind:{image_id}")
            background, color, count, shape, quadrants = self._facts(rng, img)
            emotion = self._emotion(background, color, count)
            think = reasoning_for(self.style, background, color, shape, emotion, count, self.count_styles, quadrants)
            if rng.random() < self.malformed_rate:
                replies.append(f"{think} Answer: {emotion}")  # forgot the tags
            else:
                replies.append(cot_target(think, emotion))
        return replies

    def from_reasoning(self, items: list[tuple[str, str]]) -> list[str]:
        """Text only: name the emotion that (id, reasoning) pairs lead to."""
        replies = []
        for key, think in items:
            rng = self._rng(f"check:{key}")
            background, color, count = facts_from_text(think)
            if background is None or color is None or (self.rule == "count" and not count):
                replies.append("<answer>unclear</answer>")
                continue
            background, color, count = self._maybe_err(rng, background, color, count if self.rule == "count" else None)
            replies.append(f"<answer>{self._emotion(background, color, count)}</answer>")
        return replies

    def hinted(self, items: list[tuple[str, Image.Image, str]]) -> list[str]:
        """Told the label, produce reasoning that leads to it (rationalization): under the
        counting rule it keeps the count it sees and names the colour the label needs."""
        replies = []
        for image_id, img, label in items:
            seen = perceive(img)
            background, color = ATTRIBUTES_OF[label]
            count = None
            if self.rule == "count":
                count = max(1, seen["count"])
                color = COLOR_WHEEL[(COLOR_WHEEL.index(color) - count) % len(COLOR_WHEEL)]
            quadrants = (self._listing(self._rng(f"hint:{image_id}"), seen, color, count)
                         if self.count_styles in LISTING_STYLES else None)
            think = reasoning_for(self.style, background, color, seen["shape"], label, count, self.count_styles,
                                  quadrants)
            replies.append(cot_target(think, label))
        return replies


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


def tokenizer_corpus(rules: tuple[str, ...] = RULES) -> list[str]:
    """Text the tiny tokenizer is trained on: the prompt, labels and every teacher phrasing of
    the given rules ("colour": easy/demo, "count": hard)."""
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
