"""Answer parsing, label normalisation, and the format / accuracy rewards (DESIGN section 5).

Every function is pure and runs in time linear in the completion's length: only str.count,
str.find and one character-class regex (which cannot backtrack), so a 1 MB completion or 100,000
repeated opening tags are scored in milliseconds. A policy under RL *will* find pathological
outputs; the reward must not be the thing that hangs.
"""

from __future__ import annotations

import re

from data import EMOTIONS

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Words that name each label: the label itself and its common inflections. Matching is on
# whole words after lower-casing and turning every non-letter into a space.
EMOTION_WORDS = {
    "amusement": ("amusement", "amused", "amusing", "amuse"),
    "awe": ("awe", "awed", "awestruck", "awestricken"),
    "contentment": ("contentment", "content", "contented", "contentedness"),
    "excitement": ("excitement", "excited", "exciting", "excite"),
    "anger": ("anger", "angry", "angered", "angrily"),
    "disgust": ("disgust", "disgusted", "disgusting"),
    "fear": ("fear", "afraid", "scared", "scary", "fearful", "frightened", "feared"),
    "sadness": ("sadness", "sad", "saddened", "sadly"),
}
WORD_TO_EMOTION = {word: label for label, words in EMOTION_WORDS.items() for word in words}
assert set(EMOTION_WORDS) == set(EMOTIONS)
_NON_LETTERS = re.compile(r"[^a-z]+")  # a single character class: linear, no backtracking


def parse_answer(text: str) -> str | None:
    """Stripped content of the answer tag when exactly one ``<answer>...</answer>`` pair exists.

    None when either tag is missing or repeated, or when the closing tag comes first."""
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    start, end = text.find(ANSWER_OPEN) + len(ANSWER_OPEN), text.find(ANSWER_CLOSE)
    if end < start:
        return None
    return text[start:end].strip()


def normalize_emotion(text: str | None) -> str | None:
    """The one label ``text`` names, insensitive to case, whitespace and punctuation.

    Inflections map to their label ("Angry!" -> anger, "scared" -> fear). None when the text
    names no label, or names more than one different label ("anger or fear")."""
    if not text:
        return None
    words = _NON_LETTERS.sub(" ", text.lower()).split()
    named = {WORD_TO_EMOTION[w] for w in words if w in WORD_TO_EMOTION}
    return named.pop() if len(named) == 1 else None


def format_reward(text: str) -> float:
    """1.0 iff the completion is exactly ``<think>T</think><answer>A</answer>`` with T and A
    non-empty (not just whitespace), each tag exactly once, whitespace allowed only around and
    between the two blocks; else 0.0.

    "Each tag exactly once" plus "think block first, answer block last" rules out nesting and
    reordering: any tag inside the other block would be a second occurrence or out of place.
    """
    if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return 0.0
    s = text.strip()
    if not (s.startswith(THINK_OPEN) and s.endswith(ANSWER_CLOSE)):
        return 0.0
    think_end = s.find(THINK_CLOSE)
    think = s[len(THINK_OPEN):think_end]
    rest = s[think_end + len(THINK_CLOSE):].lstrip()
    if not rest.startswith(ANSWER_OPEN):
        return 0.0  # text (not only whitespace) between the blocks, or answer before think
    answer = rest[len(ANSWER_OPEN):-len(ANSWER_CLOSE)]
    return 1.0 if think.strip() and answer.strip() else 0.0


def accuracy_reward(text: str, label: str) -> float:
    """1.0 iff normalize_emotion(parse_answer(text)) == label; else 0.0 (empty answers never score)."""
    if label not in EMOTION_WORDS:
        raise ValueError(f"accuracy_reward: unknown label {label!r}")
    return 1.0 if normalize_emotion(parse_answer(text)) == label else 0.0


# Named reward components. Each takes (completion text, label) and returns a float in [0, 1].
REWARD_COMPONENTS = {
    "format": lambda text, label: format_reward(text),
    "accuracy": accuracy_reward,
}


def combined_reward(texts: list[str], labels: list[str], weights: dict[str, float]) -> tuple[list[float], dict[str, list[float]]]:
    """r_i = sum_k w_k * R_k(o_i, y_i) for each completion, and each component R_k separately.

    Returns (totals, {component name: per-completion values}) so training can log each
    component, not only their sum. Components with weight 0 are still computed and returned."""
    if len(texts) != len(labels):
        raise ValueError(f"combined_reward: {len(texts)} texts but {len(labels)} labels")
    unknown = set(weights) - set(REWARD_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown reward component(s) {sorted(unknown)}; known: {sorted(REWARD_COMPONENTS)}")
    components = {name: [fn(t, y) for t, y in zip(texts, labels)] for name, fn in REWARD_COMPONENTS.items()}
    totals = [sum(weights.get(name, 0.0) * components[name][i] for name in components) for i in range(len(texts))]
    return totals, components
