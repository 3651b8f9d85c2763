"""Time the rewards on megabyte-sized adversarial completions (not a test: timings vary).

    python scripts/reward_timing.py

Prints the milliseconds that format_reward + accuracy_reward take on each input. The parser
is linear by construction (no regular expressions); this shows the constant is small.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewards import accuracy_reward, format_reward  # noqa: E402

MB = 1_000_000
ZW = "\u200b\ufeff\u2060"
CASES = {
    "1 MB think of 'a'": "<think>" + "a" * MB + "</think><answer>awe</answer>",
    "1 MB think of zero-width chars": "<think>" + ZW * (MB // 3) + "</think><answer>awe</answer>",
    "3 MB of whitespace around the answer":
        "<think>x</think><answer>" + " " * MB + "awe" + " " * MB + "</answer>" + " " * MB,
    "125,000 opening answer tags": "<answer>" * (MB // 8),
    "62,500 think tag pairs": "<think>" * (MB // 16) + "</think>" * (MB // 16),
    "250,000 repeated answer words": "<think>x</think><answer>" + "awe " * (MB // 4) + "</answer>",
    "1 MB of dots after the answer": "<think>x</think><answer>awe</answer>" + "." * MB,
    "250,000 distinct code points in the answer":
        "<think>x</think><answer>" + "".join(map(chr, range(0x30000, 0x30000 + MB // 4))) + "</answer>",
}


def main() -> None:
    for name, text in CASES.items():
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            format_reward(text)
            accuracy_reward(text, "awe")
            best = min(best, time.perf_counter() - start)
        print(f"{1000 * best:8.2f} ms  {len(text):>9,} chars  {name}")


if __name__ == "__main__":
    main()
