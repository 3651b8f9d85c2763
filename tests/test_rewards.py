"""Every reward rule, with the completions a policy under RL finds, and linear-time parsing.

The main table lists adversarial completions for the label "anger" with the format and
accuracy reward each must get. eval.py's prediction must agree with the accuracy reward on
every row (it uses the same parser)."""

import pytest

import eval as evaluation
from data import EMOTIONS, INSTRUCTION
from rewards import (EMOTION_WORDS, accuracy_reward, combined_reward, format_reward, has_visible, normalize_emotion,
                     parse_answer, predicted_label)

GOOD = "<think>The background is bright and the object is red.</think><answer>excitement</answer>"
T = "<think>dark background, red square</think>"   # a valid think block
ZW = "\u200b\ufeff\u2060"                           # zero-width space, BOM, word joiner (category Cf)


def answer(a: str) -> str:
    return f"{T}<answer>{a}</answer>"


# (completion, format reward, accuracy reward for the label "anger")
ADVERSARIAL = [
    # --- valid forms that must still score --------------------------------------------------
    (answer("anger"), 1.0, 1.0),
    (answer("Anger"), 1.0, 1.0),                                    # case-insensitive content
    (answer("ANGER!"), 1.0, 1.0),                                   # one trailing "!"
    (answer(" angry. "), 1.0, 1.0),                                 # whitespace, inflection, one "."
    (answer("angered"), 1.0, 1.0),
    (answer("\n\tanger\n"), 1.0, 1.0),                              # newlines and tabs are whitespace
    ("  \n" + T + "\n\n<answer>anger</answer>\n ", 1.0, 1.0),       # whitespace around and between
    ("<answer>anger</answer>", 0.0, 1.0),                           # the label baseline: no think block
    ("<answer>Angry.</answer>\n", 0.0, 1.0),
    ("<think>a < b and c > d</think><answer>anger</answer>", 1.0, 1.0),  # brackets are not tags
    ("<think>x" + ZW + "</think><answer>anger</answer>", 1.0, 1.0),  # invisible chars beside a visible one
    ("<think><THINK>x</THINK></think><answer>anger</answer>", 1.0, 1.0),  # upper-case "tags" are text
    ("reasoning without tags <answer>anger</answer>", 0.0, 1.0),   # text before the answer: format's job
    # --- negations, hedges, questions, lists, sentences, repeats ----------------------------
    (answer("not anger"), 1.0, 0.0),
    (answer("no anger"), 1.0, 0.0),
    (answer("anything but anger"), 1.0, 0.0),
    (answer("anger?"), 1.0, 0.0),
    (answer("anger?!"), 1.0, 0.0),
    (answer("maybe anger"), 1.0, 0.0),
    (answer("probably anger"), 1.0, 0.0),
    (answer("anger or fear"), 1.0, 0.0),
    (answer("anger, fear"), 1.0, 0.0),
    (answer("anger/fear"), 1.0, 0.0),
    (answer("anger fear sadness awe amusement contentment excitement disgust"), 1.0, 0.0),
    (answer("I feel anger"), 1.0, 0.0),
    (answer("the emotion is anger"), 1.0, 0.0),
    (answer("anger anger"), 1.0, 0.0),
    (answer("anger, angry"), 1.0, 0.0),
    (answer("angeranger"), 1.0, 0.0),
    # --- punctuation, quoting, look-alikes ----------------------------------------------------
    (answer("anger.."), 1.0, 0.0),                                  # at most ONE trailing mark
    (answer("anger!!"), 1.0, 0.0),
    (answer("anger.!"), 1.0, 0.0),
    (answer("anger ."), 1.0, 0.0),                                  # the mark must follow the word
    (answer(".anger"), 1.0, 0.0),
    (answer("'anger'"), 1.0, 0.0),
    (answer('"anger"'), 1.0, 0.0),
    (answer("anger:"), 1.0, 0.0),
    (answer("**anger**"), 1.0, 0.0),
    (answer("an ger"), 1.0, 0.0),
    (answer("angers"), 1.0, 0.0),
    (answer("dangerous"), 1.0, 0.0),
    (answer("angrily"), 1.0, 0.0),                                  # adverbs are not listed
    (answer("\u0430nger"), 1.0, 0.0),                               # Cyrillic a
    (answer("ANGE\u0280"), 1.0, 0.0),                               # small-capital R, not ASCII
    # --- trailing text after the answer -----------------------------------------------------
    (answer("anger") + " actually fear", 0.0, 0.0),
    (answer("anger") + ".", 0.0, 0.0),
    (answer("anger") + ZW, 0.0, 0.0),                               # invisible, but not whitespace
    (answer("anger") + "<answer>fear</answer>", 0.0, 0.0),          # a second answer block
    (answer("anger") + "</think>", 0.0, 0.0),
    # --- invisible content ------------------------------------------------------------------
    (answer(ZW + "anger"), 1.0, 0.0),                               # only whitespace is stripped
    (answer("an\u200bger"), 1.0, 0.0),
    (answer("anger\u00ad"), 1.0, 0.0),                              # soft hyphen (Cf)
    (f"<think>{ZW}</think><answer>anger</answer>", 0.0, 1.0),       # think of zero-width characters
    (f"<think>{ZW * 1000}</think><answer>anger</answer>", 0.0, 1.0),
    ("<think>\u3164\u2800 \u00a0\u3000</think><answer>anger</answer>", 0.0, 1.0),  # blank filler, braille, spaces
    ("<think>\u0301\ufe0f\U000e0041</think><answer>anger</answer>", 0.0, 1.0),  # lone mark, selector, tag char
    ("<think>\x00\x07</think><answer>anger</answer>", 0.0, 1.0),   # control characters
    ("<think></think><answer>anger</answer>", 0.0, 1.0),
    ("<think> \n </think><answer>anger</answer>", 0.0, 1.0),
    (f"{T}<answer>{ZW}</answer>", 0.0, 0.0),                        # invisible answer
    (f"{T}<answer> </answer>", 0.0, 0.0),
    (f"{T}<answer></answer>", 0.0, 0.0),
    (ZW + answer("anger"), 0.0, 1.0),                               # zero-width before the think block
    # --- nested, duplicated, reordered, upper-case, unterminated tags --------------------------
    ("<think>x<answer>anger</answer></think>", 0.0, 0.0),           # answer nested in think
    ("<think>x</think><answer><think>y</think>anger</answer>", 0.0, 0.0),  # think nested in answer
    ("<think>x</think><think>y</think><answer>anger</answer>", 0.0, 1.0),  # duplicated think
    ("<think>x<think>y</think><answer>anger</answer>", 0.0, 1.0),   # extra opening think
    ("<think>x</think></think><answer>anger</answer>", 0.0, 1.0),   # extra closing think
    (f"{T}<answer>anger</answer><answer>anger</answer>", 0.0, 0.0),  # duplicated answer
    (f"{T}<answer><answer>anger</answer>", 0.0, 0.0),                # duplicated opening
    (f"{T}<answer>anger</answer></answer>", 0.0, 0.0),               # duplicated closing
    ("<answer>anger</answer><think>x</think>", 0.0, 0.0),           # reordered
    (f"{T}</answer>anger<answer>", 0.0, 0.0),                       # reversed answer tags
    ("</think>x<think><answer>anger</answer>", 0.0, 1.0),           # reversed think tags
    ("<THINK>x</THINK><ANSWER>anger</ANSWER>", 0.0, 0.0),           # tags are case-sensitive
    (f"{T}<Answer>anger</Answer>", 0.0, 0.0),
    ("<think>x</think><answer>anger</ANSWER>", 0.0, 0.0),
    (f"{T}<answer>anger", 0.0, 0.0),                                # unterminated answer
    ("<think>x<answer>anger</answer>", 0.0, 1.0),                   # unterminated think
    (f"{T}anger</answer>", 0.0, 0.0),                               # unopened answer
    (f"{T}< answer>anger</answer>", 0.0, 0.0),                      # a near-miss tag is text
    # --- text around or between the blocks ------------------------------------------------
    ("Sure! " + answer("anger"), 0.0, 1.0),
    (T + " so the answer is <answer>anger</answer>", 0.0, 1.0),
    ("", 0.0, 0.0),
    ("anger", 0.0, 0.0),
]


@pytest.mark.parametrize("text, fmt, acc", ADVERSARIAL)
def test_adversarial_completions(text, fmt, acc):
    assert format_reward(text) == fmt
    assert accuracy_reward(text, "anger") == acc
    # eval predicts with the same parser: "anger" exactly when the reward pays
    assert (evaluation.prediction_of(text)["pred"] == "anger") == (acc == 1.0)
    assert evaluation.prediction_of(text)["format"] == fmt


def test_the_table_is_large_and_covers_both_outcomes():
    assert len(ADVERSARIAL) >= 50
    assert len({text for text, _, _ in ADVERSARIAL}) == len(ADVERSARIAL)      # no duplicated rows
    assert {(f, a) for _, f, a in ADVERSARIAL} == {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}


def test_the_instruction_asks_for_what_the_reward_pays():
    assert "<think>" in INSTRUCTION and "<answer>" in INSTRUCTION and "one emotion word" in INSTRUCTION


# ---------------------------------------------------------------------------------------------
# parse_answer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (GOOD, "excitement"),
    ("<answer>  awe \n</answer>", "awe"),                       # stripped
    ("<answer>awe</answer> \n\t ", "awe"),                      # only whitespace after: fine
    ("blah <answer>Fear</answer>", "Fear"),                     # text before is not parse's business
    ("<answer>not awe</answer>", "not awe"),                    # content is normalize's business
    ("<answer></answer>", ""),                                  # present but empty
    ("blah <answer>Fear</answer> trailing", None),              # the answer must end the completion
    ("<answer>awe</answer>\u200b", None),                       # zero-width is not whitespace
    ("no tags at all", None),
    ("<answer>awe", None),                                      # unclosed
    ("awe</answer>", None),                                     # unopened
    ("</answer>awe<answer>", None),                             # reversed
    ("</answer><answer>", None),
    ("<answer>awe</answer><answer>fear</answer>", None),        # two pairs
    ("<answer>awe<answer>fear</answer>", None),                 # duplicated opening
    ("<ANSWER>awe</ANSWER>", None),                             # tags are case-sensitive
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


# ---------------------------------------------------------------------------------------------
# normalize_emotion
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    *[(label, label) for label in EMOTIONS],
    *[(word.upper() + ".", label) for label, words in EMOTION_WORDS.items() for word in words],
    ("  Sadness. ", "sadness"), ("ANGER!", "anger"), ("\nawe\t", "awe"), ("Fear!\n", "fear"),
    ("angry", "anger"), ("sad", "sadness"), ("afraid", "fear"), ("scared", "fear"), ("frightened", "fear"),
    ("disgusted", "disgust"), ("excited", "excitement"), ("amused", "amusement"), ("content", "contentment"),
    ("contented", "contentment"), ("awestruck", "awe"),
    ("awe-struck", None), ("'fear'", None), ("fear?", None), ("fear..", None), ("fear !", None),
    ("I feel anger", None), ("anger, angry", None), ("anger or fear", None), ("not anger", None),
    ("happy", None), ("joy", None), ("", None), ("   ", None), (".", None), ("!", None), (None, None),
    ("angers", None), ("dangerous", None), ("sadly", None),
    ("awestruc\u212a", None),                    # Kelvin sign: lower() gives "k", but it is not ASCII
])
def test_normalize_emotion(text, expected):
    assert normalize_emotion(text) == expected


def test_inflections_are_single_lowercase_ascii_words_naming_one_label():
    seen = set()
    for label, words in EMOTION_WORDS.items():
        assert words[0] == label
        for w in words:
            assert w.isascii() and w.isalpha() and w == w.lower() and w not in seen
            seen.add(w)


# ---------------------------------------------------------------------------------------------
# visibility
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("x", True), ("7", True), (".", True), ("\u00e9", True), ("\u4e2d", True), ("\U0001f600", True),
    ("", False), (" \t\n\r\x0b\x0c\u00a0\u2003\u3000", False), (ZW, False), ("\u200c\u200d\u00ad\u180e", False),
    ("\u3164\u115f\u1160\uffa0\u2800", False), ("\u0301\ufe0f\U000e0041\x00\x1f", False),
    (ZW * 10 + "a" + ZW * 10, True),
])
def test_has_visible(text, expected):
    assert has_visible(text) == expected


# ---------------------------------------------------------------------------------------------
# accuracy_reward and the combination
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", EMOTIONS)
def test_every_label_scores_only_itself(label):
    text = f"<think>x</think><answer>{label}</answer>"
    assert predicted_label(text) == label
    assert [accuracy_reward(text, y) for y in EMOTIONS] == [float(y == label) for y in EMOTIONS]


def test_accuracy_reward_unknown_label_is_an_error():
    with pytest.raises(ValueError, match="unknown label"):
        accuracy_reward(GOOD, "happiness")


def test_combined_reward_weights_and_components():
    texts = [GOOD, "<answer>excitement</answer>", "<think>x</think><answer>fear</answer>", "nothing"]
    labels = ["excitement"] * 4
    totals, parts = combined_reward(texts, labels, {"format": 0.5, "accuracy": 2.0})
    assert parts["format"] == [1.0, 0.0, 1.0, 0.0]
    assert parts["accuracy"] == [1.0, 1.0, 0.0, 0.0]
    assert totals == [2.5, 2.0, 0.5, 0.0]
    totals, parts = combined_reward(texts, labels, {"format": 1.0})   # stage 2: format only
    assert totals == [1.0, 0.0, 1.0, 0.0]
    assert parts["accuracy"] == [1.0, 1.0, 0.0, 0.0]                   # still reported for logging


def test_combined_reward_errors():
    with pytest.raises(ValueError, match="unknown reward component"):
        combined_reward([GOOD], ["awe"], {"length": 1.0})
    with pytest.raises(ValueError, match="1 texts but 2 labels"):
        combined_reward([GOOD], ["awe", "fear"], {"format": 1.0})


# ---------------------------------------------------------------------------------------------
# 1 MB adversarial completions. The parser has no regular expression, only count / find /
# strip / slicing and one pass over distinct characters, so it is linear by construction; these
# check that it also gives the right answer at that size. (Timings: scripts/reward_timing.py.)
# ---------------------------------------------------------------------------------------------
MB = 1_000_000


@pytest.mark.parametrize("text, fmt, acc", [
    ("<think>" + "a" * MB + "</think><answer>awe</answer>", 1.0, 1.0),
    ("<think>" + ZW * (MB // 3) + "</think><answer>awe</answer>", 0.0, 1.0),
    ("<think>" + ZW * (MB // 3) + "a</think><answer>awe</answer>", 1.0, 1.0),
    ("<think>x</think><answer>" + " " * MB + "awe" + " " * MB + "</answer>" + " " * MB, 1.0, 1.0),
    ("<answer>" * (MB // 8), 0.0, 0.0),
    ("<think>" * (MB // 16) + "</think>" * (MB // 16), 0.0, 0.0),
    ("<think>x</think><answer>" + "awe " * (MB // 4) + "</answer>", 1.0, 0.0),
    ("<think>x</think><answer>awe</answer>" + "." * MB, 0.0, 0.0),
    ("< think >" * (MB // 9) + "<answer>awe</answer>", 0.0, 1.0),
    ("<think>x</think><answer>" + "".join(map(chr, range(0x30000, 0x30000 + MB // 4))) + "</answer>", 1.0, 0.0),
])
def test_megabyte_completions(text, fmt, acc):
    assert format_reward(text) == fmt
    assert accuracy_reward(text, "awe") == acc
