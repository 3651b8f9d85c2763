"""Every rule of DESIGN section 5, with positive and negative cases, and linear-time parsing."""

import time

import pytest

from data import EMOTIONS
from rewards import accuracy_reward, combined_reward, format_reward, normalize_emotion, parse_answer

GOOD = "<think>The background is bright and the object is red.</think><answer>excitement</answer>"


# ---------------------------------------------------------------------------------------------
# parse_answer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (GOOD, "excitement"),
    ("<answer>  awe \n</answer>", "awe"),                       # stripped
    ("blah <answer>Fear</answer> trailing", "Fear"),            # surrounding text is not parse's business
    ("<answer></answer>", ""),                                  # present but empty
    ("no tags at all", None),
    ("<answer>awe", None),                                      # unclosed
    ("awe</answer>", None),                                     # unopened
    ("</answer>awe<answer>", None),                             # reversed
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
    ("  Sadness. ", "sadness"), ("ANGER!", "anger"), ("\nawe\t", "awe"), ("'fear'", "fear"),
    ("angry", "anger"), ("sad", "sadness"), ("afraid", "fear"), ("scared", "fear"), ("frightened", "fear"),
    ("disgusted", "disgust"), ("excited", "excitement"), ("amused", "amusement"), ("content", "contentment"),
    ("contented", "contentment"), ("awestruck", "awe"), ("awe-struck", "awe"),
    ("I feel anger", "anger"),                   # one label named among other words
    ("anger, angry", "anger"),                   # the same label twice is still one label
    ("anger or fear", None),                     # two labels
    ("happy", None), ("joy", None),              # not one of the 8
    ("", None), ("   ", None), (None, None),
    ("angers", None), ("dangerous", None),       # whole words only, no substring matches
])
def test_normalize_emotion(text, expected):
    assert normalize_emotion(text) == expected


# ---------------------------------------------------------------------------------------------
# format_reward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    GOOD,
    "<think>x</think><answer>y</answer>",
    "  \n<think>multi\nline\nreasoning</think>\n\n<answer> awe </answer>\n ",   # whitespace around/between
    "<think>a < b and c > d</think><answer>fear</answer>",                      # angle brackets are not tags
])
def test_format_reward_accepts(text):
    assert format_reward(text) == 1.0


@pytest.mark.parametrize("text", [
    "",
    "<answer>awe</answer>",                                         # no think block
    "<think>x</think>",                                             # no answer block
    "<think></think><answer>awe</answer>",                          # empty think
    "<think>  \n </think><answer>awe</answer>",                     # whitespace-only think
    "<think>x</think><answer> </answer>",                           # empty answer
    "<answer>awe</answer><think>x</think>",                         # reordered
    "<think>x</think> so the answer is <answer>awe</answer>",       # text between blocks
    "Sure! <think>x</think><answer>awe</answer>",                   # text before
    "<think>x</think><answer>awe</answer> Hope this helps",         # text after
    "<think>x<answer>awe</answer></think>",                         # answer nested in think
    "<think>x</think><answer><think>y</think>awe</answer>",         # think nested in answer
    "<think>x</think><think>y</think><answer>awe</answer>",         # duplicated think
    "<think>x</think><answer>awe</answer><answer>fear</answer>",    # duplicated answer
    "<think>x<think>y</think><answer>awe</answer>",                 # extra opening tag
    "<think>x</think><answer>awe",                                  # unclosed answer
])
def test_format_reward_rejects(text):
    assert format_reward(text) == 0.0


# ---------------------------------------------------------------------------------------------
# accuracy_reward and the combination
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, label, expected", [
    (GOOD, "excitement", 1.0),
    (GOOD, "anger", 0.0),
    ("<answer>Angry.</answer>", "anger", 1.0),        # no think: accuracy still judged (format is separate)
    ("<think>x</think><answer></answer>", "awe", 0.0),  # empty answer never scores
    ("<think>awe</think>awe", "awe", 0.0),            # no answer tag
    ("<answer>awe or fear</answer>", "awe", 0.0),     # hedging does not score
    ("<answer>awe</answer><answer>awe</answer>", "awe", 0.0),
])
def test_accuracy_reward(text, label, expected):
    assert accuracy_reward(text, label) == expected


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
# Linear time on adversarial completions (a regex with nested quantifiers would take minutes)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "<think>" + "a" * 1_000_000 + "</think><answer>awe</answer>",
    "<answer>" * 100_000,
    "<think>" * 100_000 + "</think>" * 100_000,
    "<think>x</think><answer>" + "anger " * 200_000 + "</answer>",
    ("< think >" * 50_000) + "<answer>awe</answer>",
])
def test_rewards_are_linear_time(text):
    start = time.perf_counter()
    format_reward(text)
    accuracy_reward(text, "awe")
    assert time.perf_counter() - start < 0.5
