"""The toy teachers: what they see in the pixels, the reasoning they write, and reading it back."""

from __future__ import annotations

import random
import re
import zlib

import numpy as np
from PIL import Image

from data import cot_target
from toy import ATTRIBUTES_OF, COLOR_WHEEL, COLORS, COUNT_WORDS, TOY_TABLE, counting_rule, landing_color


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
