"""Answer parsing, label normalisation, and the format / accuracy rewards.

The policy optimises whatever the reward accepts, so the reward accepts exactly what the
instruction asks for, one emotion word as the last thing in the completion, and nothing else:
"not anger", "anger?", "maybe anger", "I feel anger", "anger anger" and
"<answer>anger</answer> actually fear" all score 0 for the label anger. eval.py predicts with
the same parser (`predicted_label`), so reported accuracy counts exactly what training rewards.

Every function is pure and runs in time linear in the completion's length: only str.count,
str.find, str.strip, slicing, a dictionary lookup and one pass over the *distinct* characters of
a block; no regular expressions, so nothing can backtrack. A policy under RL *will* find
pathological outputs (1 MB of text, 100,000 repeated tags); the reward must not hang on them.
"""

from __future__ import annotations

import unicodedata

from data import EMOTIONS

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# The one-word answers that name each label: the label itself and its listed inflections
# (adjectives and participles that name the feeling). Nothing else counts: no adverbs, no
# verbs, no hyphenated or multi-word forms. An answer matches only as a whole, after
# normalize_emotion's stripping and lower-casing.
EMOTION_WORDS = {
    "amusement": ("amusement", "amused", "amusing"),
    "awe": ("awe", "awed", "awestruck"),
    "contentment": ("contentment", "content", "contented"),
    "excitement": ("excitement", "excited", "exciting"),
    "anger": ("anger", "angry", "angered"),
    "disgust": ("disgust", "disgusted", "disgusting"),
    "fear": ("fear", "afraid", "scared", "scary", "fearful", "frightened"),
    "sadness": ("sadness", "sad", "saddened"),
}
WORD_TO_EMOTION = {word: label for label, words in EMOTION_WORDS.items() for word in words}
assert set(EMOTION_WORDS) == set(EMOTIONS)

# Letters, numbers, punctuation and symbols are visible, except these few that render as blank
# space although Unicode files them as letters or symbols (Hangul fillers, the blank Braille cell).
# Whitespace (Z*), format characters such as U+200B / U+FEFF / U+2060 (Cf), other control,
# private-use and unassigned code points (C*), and combining marks on their own (M*) are not.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_visible(ch: str) -> bool:
    """True iff the single character `ch` draws something: Unicode category L*, N*, P* or S*,
    and not one of the blank-rendering fillers."""
    return unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANK_LETTERS


def has_visible(text: str) -> bool:
    """True iff `text` contains at least one visible character (see `is_visible`).

    Checks each distinct character once: set() is one C-speed pass, so a megabyte of
    zero-width spaces is a one-element set, and the work stays linear in len(text)."""
    return any(map(is_visible, set(text)))


def parse_answer(text: str) -> str | None:
    """The stripped content of the answer tag, or None.

    Not None only when the completion holds exactly one ``<answer>`` and one ``</answer>``, in
    that order, and nothing but whitespace follows ``</answer>``: the answer ends the completion,
    so "<answer>anger</answer> actually fear" is None. Text before ``<answer>`` (the think block)
    is not parse's business. Tags are case-sensitive: ``<ANSWER>`` is plain text."""
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    end = text.find(ANSWER_CLOSE)
    if text[end + len(ANSWER_CLOSE):].strip():
        # something after the answer (a retraction, a second opinion, chatter), or the
        # reversed "</answer>...<answer>", whose opening tag is itself text after the close
        return None
    return text[text.find(ANSWER_OPEN) + len(ANSWER_OPEN):end].strip()


def normalize_emotion(text: str | None) -> str | None:
    """The label that `text` names when it is exactly ONE label word; else None.

        strip surrounding whitespace -> drop at most one trailing "." or "!" -> lower-case
        -> the whole remaining string must be a label or a listed inflection ("Angry!" -> anger)

    A negation, hedge, question, list or sentence ("not anger", "maybe anger", "anger?",
    "anger or fear", "I feel anger", "anger anger") is not the one word the instruction asks
    for: None. So are "anger.." and "anger ." (one trailing mark, right after the word), and any
    non-ASCII look-alike (the Kelvin sign lower-cases to "k", but it is not the letter)."""
    if text is None:
        return None
    word = text.strip()
    if word.endswith((".", "!")):
        word = word[:-1]
    if not word.isascii():
        return None
    return WORD_TO_EMOTION.get(word.lower())


def predicted_label(text: str) -> str | None:
    """The label a completion predicts: normalize_emotion(parse_answer(text)). The accuracy
    reward and eval.py both use this, so they cannot disagree about what counts."""
    return normalize_emotion(parse_answer(text))


def format_reward(text: str) -> float:
    """1.0 iff the whole completion is ``<think>T</think><answer>A</answer>``; else 0.0.

    Only whitespace before, between and after the two blocks; each of the four tags exactly
    once, so nothing is nested, duplicated or unterminated; tags case-sensitive; and T and A
    each contain a visible character (`has_visible`: whitespace and zero-width or other
    invisible characters do not count). The answer's *content* is the accuracy reward's job."""
    if any(text.count(tag) != 1 for tag in TAGS):
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
    return 1.0 if has_visible(think) and has_visible(answer) else 0.0


def accuracy_reward(text: str, label: str) -> float:
    """1.0 iff predicted_label(text) == label, i.e. normalize_emotion(parse_answer(text)) == label;
    else 0.0. No think block is required (the label baseline answers ``<answer>label</answer>``
    alone): asking for reasoning is the format reward's job."""
    if label not in EMOTION_WORDS:
        raise ValueError(f"accuracy_reward: unknown label {label!r}")
    return 1.0 if predicted_label(text) == label else 0.0


# Named reward components. Each takes (completion text, label) and returns a float in [0, 1].
REWARD_COMPONENTS = {
    "format": lambda text, label: format_reward(text),
    "accuracy": accuracy_reward,
}


def combined_reward(texts: list[str], labels: list[str],
                    weights: dict[str, float]) -> tuple[list[float], dict[str, list[float]]]:
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


# ---------------------------------------------------------------------------------------------
# Adapters for multi-GPU trainers (docs/handoff.md). Each is a thin
# wrapper over the rewards above, with the calling convention of one library, so those libraries
# score completions exactly as this project does. Neither library is imported here.
# ---------------------------------------------------------------------------------------------
def completion_text(completion) -> str:
    """The text of one completion as TRL's GRPOTrainer passes it.

    A standard (plain-text) dataset gives a string. A conversational dataset gives a list of
    messages, normally one: ``[{"role": "assistant", "content": "..."}]``, where content may also
    be a list of blocks ``[{"type": "text", "text": "..."}]``. The texts of all messages are joined
    in order, so the rewards see the whole reply, as they do in this project's own loop."""
    if isinstance(completion, str):
        return completion
    if not isinstance(completion, list):
        raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")
    parts = []
    for message in completion:
        if not isinstance(message, dict):
            raise TypeError(f"a conversational completion must hold message dicts, got {type(message).__name__}")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(block["text"] for block in content if isinstance(block, dict) and block.get("type") == "text")
        elif content is not None:   # None: a message with tool calls only
            raise TypeError(f"message content must be a string or a list of blocks, got {type(content).__name__}")
    return "".join(parts)


def trl_format_reward(completions, **kwargs) -> list[float]:
    """format_reward of each completion, with TRL's reward-function signature.

    TRL's GRPOTrainer calls ``f(prompts=..., completions=..., completion_ids=..., <every other
    dataset column>=..., trainer_state=..., ...)``, all by keyword, one list entry per completion
    (each dataset column repeated for the G completions of its prompt). Only `completions` is used."""
    return [format_reward(completion_text(c)) for c in completions]


def trl_accuracy_reward(completions, label, **kwargs) -> list[float]:
    """accuracy_reward of each completion against the dataset's `label` column (the column that
    `cot_builder.py export --to trl` writes), with TRL's reward-function signature."""
    if len(completions) != len(label):
        raise ValueError(f"trl_accuracy_reward: {len(completions)} completions but {len(label)} labels")
    return [accuracy_reward(completion_text(c), y) for c, y in zip(completions, label)]


def verl_compute_score(data_source, solution_str, ground_truth, extra_info=None,
                       format_weight: float = 1.0, accuracy_weight: float = 1.0) -> dict:
    """One response's reward with verl's custom reward-function signature (stages 3 and 4).

        score = format_weight * format_reward(o) + accuracy_weight * accuracy_reward(o, y)

    verl calls ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`` once per
    response, with the decoded response and ``reward_model["ground_truth"]`` of its row (the label,
    as `cot_builder.py export --to verl` writes it). Extra keyword arguments come from verl's
    ``custom_reward_function.reward_kwargs``. A dict result must hold "score"; verl logs its other
    keys, here each component before weighting."""
    totals, components = combined_reward([solution_str], [ground_truth],
                                         {"format": format_weight, "accuracy": accuracy_weight})
    return {"score": totals[0], **{name: values[0] for name, values in components.items()}}


def verl_format_score(data_source, solution_str, ground_truth, extra_info=None) -> dict:
    """Stage 2's reward (format only) with verl's signature: verl_compute_score with accuracy weight 0.
    The accuracy component is still computed and logged."""
    return verl_compute_score(data_source, solution_str, ground_truth, extra_info, accuracy_weight=0.0)
