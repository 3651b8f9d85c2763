"""Mutation check: do the tests catch small, plausible wrong edits of the math and the rewards?

    python scripts/mutation_check.py            # all 57 mutations (~5 min on 2 busy CPU cores)
    python scripts/mutation_check.py -k clip    # only mutations whose name contains "clip"
    python scripts/mutation_check.py --list     # names only

Each mutation is one exact string replacement in one file. For each, the repository's tracked
files are copied to a temporary folder, the replacement is made there (the working files are
never touched), and the relevant test files run with `pytest -x -q`. A mutation is *killed* when
the tests fail, and *survives* when they pass: a survivor is a bug the suite would let through.
A mutation whose target string is not found exactly once is an error, not a skip: the code has
changed and the mutation must be updated. The unmutated copy must pass first.

Exit status: 0 when every mutation is killed, 1 when any survives, 2 on a stale mutation.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATH = ("tests/test_grpo_math.py",)
REWARDS = ("tests/test_rewards.py",)
EVAL = ("tests/test_sft_eval.py", "-k", "metrics or prediction or unparseable or markdown")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    # ---- group advantages ------------------------------------------------------------------
    Mutation("population std instead of Bessel", "clgrpo.py",
             "r.std(dim=1, unbiased=True, keepdim=True)", "r.std(dim=1, unbiased=False, keepdim=True)", MATH),
    Mutation("eps inside the sqrt", "clgrpo.py",
             "(r.std(dim=1, unbiased=True, keepdim=True) + eps)",
             "torch.sqrt(r.var(dim=1, unbiased=True, keepdim=True) + eps)", MATH),
    Mutation("no eps in the denominator", "clgrpo.py",
             "(r.std(dim=1, unbiased=True, keepdim=True) + eps)", "r.std(dim=1, unbiased=True, keepdim=True)", MATH),
    Mutation("zero-std test: std == 0", "clgrpo.py",
             "zero_std = r.amax(dim=1) == r.amin(dim=1)", "zero_std = r.std(dim=1) == 0", MATH),
    Mutation("zero-std test: std below a tolerance", "clgrpo.py",
             "zero_std = r.amax(dim=1) == r.amin(dim=1)", "zero_std = r.std(dim=1) < 1e-6", MATH),
    Mutation("zero-std test: range below eps", "clgrpo.py",
             "zero_std = r.amax(dim=1) == r.amin(dim=1)", "zero_std = (r.amax(dim=1) - r.amin(dim=1)) < eps", MATH),
    Mutation("zero-std groups not zeroed", "clgrpo.py",
             "advantages = torch.where(zero_std[:, None], torch.zeros_like(centred), centred)",
             "advantages = centred", MATH),
    Mutation("mean over the batch, not the group", "clgrpo.py",
             "centred = r - r.mean(dim=1, keepdim=True)", "centred = r - r.mean()", MATH),
    # ---- k3 KL -------------------------------------------------------------------------------
    Mutation("k3 sign flip on the linear term", "clgrpo.py",
             "return torch.exp(d) - d - 1.0", "return torch.exp(d) + d - 1.0", MATH),
    Mutation("KL direction: logp - ref", "clgrpo.py", "d = ref_logp - logp", "d = logp - ref_logp", MATH),
    # ---- aggregation and masking ---------------------------------------------------------------
    Mutation("values * mask instead of selecting", "clgrpo.py",
             "x = torch.where(m, values, torch.zeros_like(values))", "x = values * m", MATH),
    Mutation("no clamp on an all-masked row's length", "clgrpo.py",
             "lengths = m.sum(dim=1).clamp(min=1)", "lengths = m.sum(dim=1)", MATH),
    Mutation("token aggregation: no clamp on an all-masked batch", "clgrpo.py",
             "return x.sum() / m.sum().clamp(min=1)", "return x.sum() / m.sum()", MATH),
    Mutation("token aggregation divides by N*T", "clgrpo.py",
             "return x.sum() / m.sum().clamp(min=1)", "return x.sum() / m.numel()", MATH),
    Mutation("sequence aggregation: mean of sums over mean length", "clgrpo.py",
             "return (x.sum(dim=1) / lengths).mean()", "return x.sum(dim=1).mean() / lengths.float().mean()", MATH),
    Mutation("sequence aggregation divides by N*T", "clgrpo.py",
             "return (x.sum(dim=1) / lengths).mean()", "return (x.sum(dim=1) / values.shape[1]).mean()", MATH),
    Mutation("constant aggregation ignores max_len", "clgrpo.py",
             "(values.shape[0] * (max_len or values.shape[1]))", "(values.shape[0] * values.shape[1])", MATH),
    Mutation("constant aggregation divides by kept tokens", "clgrpo.py",
             "(values.shape[0] * (max_len or values.shape[1]))", "m.sum().clamp(min=1)", MATH),
    # ---- ratio and clipped surrogate -------------------------------------------------------------
    Mutation("ratio inverted", "clgrpo.py",
             "ratio = torch.exp(logp - old_logp)", "ratio = torch.exp(old_logp - logp)", MATH),
    Mutation("max instead of min in the surrogate", "clgrpo.py",
             "return torch.minimum(ratio * a,", "return torch.maximum(ratio * a,", MATH),
    Mutation("clip bounds swapped (eps_low above, eps_high below)", "clgrpo.py",
             "ratio.clamp(1.0 - eps_low, 1.0 + eps_high)", "ratio.clamp(1.0 - eps_high, 1.0 + eps_low)", MATH),
    Mutation("lower clip bound sign", "clgrpo.py",
             "ratio.clamp(1.0 - eps_low, 1.0 + eps_high)", "ratio.clamp(1.0 + eps_low, 1.0 + eps_high)", MATH),
    Mutation("KL added instead of subtracted", "clgrpo.py",
             "objective = objective - beta * kl", "objective = objective + beta * kl", MATH),
    Mutation("loss not negated", "clgrpo.py",
             "loss = -masked_aggregate(objective, mask, aggregation, max_len)",
             "loss = masked_aggregate(objective, mask, aggregation, max_len)", MATH),
    # ---- diagnostics -------------------------------------------------------------------------
    Mutation("frac_clipped_lower counted on positive-advantage tokens", "clgrpo.py",
             "low = (ratio < 1.0 - eps_low) & (a < 0) & m", "low = (ratio < 1.0 - eps_low) & (a > 0) & m", MATH),
    Mutation("frac_clipped_upper counted on negative-advantage tokens", "clgrpo.py",
             "high = (ratio > 1.0 + eps_high) & (a > 0) & m", "high = (ratio > 1.0 + eps_high) & (a < 0) & m", MATH),
    Mutation("frac_clipped_lower against eps_high", "clgrpo.py",
             "low = (ratio < 1.0 - eps_low)", "low = (ratio < 1.0 - eps_high)", MATH),
    Mutation("clip fractions ignore the mask", "clgrpo.py",
             "high = (ratio > 1.0 + eps_high) & (a > 0) & m", "high = (ratio > 1.0 + eps_high) & (a > 0)", MATH),
    Mutation("ratio_mean over masked positions too", "clgrpo.py",
             '"ratio_mean": torch.where(m, ratio, 0.0).sum() / n_tokens', '"ratio_mean": (ratio * m).sum() / n_tokens',
             MATH),
    Mutation("kl_mean over every position", "clgrpo.py",
             "torch.where(m, kl, 0.0).sum() / n_tokens", "kl.mean()", MATH),
    Mutation("stats: no clamp on an all-masked batch", "clgrpo.py",
             "n_tokens = m.sum().clamp(min=1)", "n_tokens = m.sum()", MATH),
    # ---- micro-batching (Part 2 helper, tested in test_grpo_math) ------------------------------
    Mutation("chunk_weight: token weighting for constant too", "clgrpo.py",
             'if aggregation == "token":\n        return mask[start:end].sum()',
             'if aggregation != "sequence":\n        return mask[start:end].sum()', MATH),
    Mutation("chunk_weight: 1/N per chunk", "clgrpo.py",
             "return (end - start) / mask.shape[0]", "return 1 / mask.shape[0]", MATH),
    # ---- rewards ------------------------------------------------------------------------------
    Mutation("strip every trailing . and !", "rewards.py",
             'if word.endswith((".", "!")):\n        word = word[:-1]', 'word = word.rstrip(".!")', REWARDS),
    Mutation("also strip a trailing ?", "rewards.py",
             'if word.endswith((".", "!")):', 'if word.endswith((".", "!", "?")):', REWARDS),
    Mutation("strip the mark before the whitespace", "rewards.py",
             'word = text.strip()\n    if word.endswith((".", "!")):\n        word = word[:-1]',
             'word = text\n    if word.endswith((".", "!")):\n        word = word[:-1]\n    word = word.strip()',
             REWARDS),
    Mutation("strip punctuation around the word", "rewards.py",
             "return WORD_TO_EMOTION.get(word.lower())", "return WORD_TO_EMOTION.get(word.lower().strip(\"'\\\"*:?\"))",
             REWARDS),
    Mutation("case-sensitive labels", "rewards.py",
             "return WORD_TO_EMOTION.get(word.lower())", "return WORD_TO_EMOTION.get(word)", REWARDS),
    Mutation("casefold instead of an ASCII check", "rewards.py",
             "if not word.isascii():\n        return None\n    return WORD_TO_EMOTION.get(word.lower())",
             "return WORD_TO_EMOTION.get(word.casefold())", REWARDS),
    Mutation("any label word in the answer counts (the old lenient rule)", "rewards.py",
             "return WORD_TO_EMOTION.get(word.lower())",
             "return next((WORD_TO_EMOTION[w] for w in word.lower().split() if w in WORD_TO_EMOTION), None)", REWARDS),
    Mutation("last word of the answer counts", "rewards.py",
             "return WORD_TO_EMOTION.get(word.lower())",
             "return WORD_TO_EMOTION.get((word.lower().split() or [''])[-1])", REWARDS),
    Mutation("trailing text after </answer> allowed", "rewards.py",
             "if text[end + len(ANSWER_CLOSE):].strip():", "if False:", REWARDS),
    Mutation("case-insensitive tags in parse_answer", "rewards.py",
             '    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:\n        return None\n    end',
             '    text = text.lower()\n'
             '    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:\n        return None\n    end',
             REWARDS),
    Mutation("case-insensitive tags in format_reward", "rewards.py",
             "    if any(text.count(tag) != 1 for tag in TAGS):",
             "    text = text.lower()\n    if any(text.count(tag) != 1 for tag in TAGS):",
             REWARDS),
    Mutation("duplicated answer tags allowed in parse_answer", "rewards.py",
             "if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:",
             "if text.count(ANSWER_OPEN) < 1 or text.count(ANSWER_CLOSE) < 1:", REWARDS),
    Mutation("duplicated tags allowed in format_reward", "rewards.py",
             "if any(text.count(tag) != 1 for tag in TAGS):", "if any(text.count(tag) < 1 for tag in TAGS):", REWARDS),
    Mutation("text between the blocks allowed", "rewards.py",
             "rest = s[think_end + len(THINK_CLOSE):].lstrip()",
             "rest = s[s.find(ANSWER_OPEN):]", REWARDS),
    Mutation("whitespace around the blocks rejected", "rewards.py", "s = text.strip()", "s = text", REWARDS),
    Mutation("visible means not whitespace", "rewards.py",
             "return any(map(is_visible, set(text)))", "return bool(text.strip())", REWARDS),
    Mutation("visible means printable", "rewards.py",
             "return any(map(is_visible, set(text)))", "return any(c.isprintable() and not c.isspace() for c in text)",
             REWARDS),
    Mutation("blank fillers count as visible", "rewards.py",
             'return unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANK_LETTERS',
             'return unicodedata.category(ch)[0] in "LNPS"', REWARDS),
    Mutation("combining marks count as visible", "rewards.py",
             'return unicodedata.category(ch)[0] in "LNPS"', 'return unicodedata.category(ch)[0] in "LNPSM"', REWARDS),
    Mutation("answer visibility not checked", "rewards.py",
             "return 1.0 if has_visible(think) and has_visible(answer) else 0.0",
             "return 1.0 if has_visible(think) else 0.0", REWARDS),
    Mutation("think visibility not checked", "rewards.py",
             "return 1.0 if has_visible(think) and has_visible(answer) else 0.0",
             "return 1.0 if has_visible(answer) else 0.0", REWARDS),
    Mutation("accuracy requires the think block", "rewards.py",
             "return 1.0 if predicted_label(text) == label else 0.0",
             "return 1.0 if predicted_label(text) == label and THINK_CLOSE in text else 0.0", REWARDS),
    # ---- eval predicts with the reward's parser --------------------------------------------------
    Mutation("eval reads any label word in the completion", "eval.py",
             '"pred": normalize_emotion(answer)', '"pred": normalize_emotion(answer or completion)', REWARDS),
    Mutation("eval: unparseable rate counts invalid labels", "eval.py",
             '"unparseable_rate": (sum(a is None for a in answers) / n)',
             '"unparseable_rate": (sum(p is None for p in preds) / n)', EVAL),
]


def copy_repo(dest: Path) -> None:
    """Copy the files git knows about (tracked, plus untracked but not ignored) into dest."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(mutation: Mutation, tree: Path) -> None:
    path = tree / mutation.file
    text = path.read_text()
    found = text.count(mutation.old)
    if found != 1:
        raise SystemExit(f"STALE mutation {mutation.name!r}: its target occurs {found} times in {mutation.file} "
                         f"(must be exactly once):\n{mutation.old}")
    path.write_text(text.replace(mutation.old, mutation.new))


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode == 0, lines[-1] if lines else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Apply each mutation to a temporary copy and check that the tests fail.")
    p.add_argument("-k", default="", help="only mutations whose name contains this text (case-insensitive)")
    p.add_argument("--list", action="store_true", help="print the mutation names and exit")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    if not chosen:
        print(f"no mutation name contains {args.k!r}; see --list")
        return 2
    if args.list:
        print("\n".join(f"{m.file:11} {m.name}" for m in chosen))
        return 0
    # Check every target first, so a stale mutation fails before minutes of test runs.
    for m in chosen:
        found = (ROOT / m.file).read_text().count(m.old)
        if found != 1:
            print(f"STALE mutation {m.name!r}: its target occurs {found} times in {m.file} (must be once):\n{m.old}")
            return 2
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as tmp:
        base = Path(tmp) / "base"
        copy_repo(base)
        suites = sorted({m.tests for m in chosen})
        for tests in suites:
            ok, last = run_tests(base, tests)
            if not ok:
                print(f"the unmutated tests fail ({' '.join(tests)}): {last}")
                return 2
        survivors = []
        for i, m in enumerate(chosen, 1):
            tree = Path(tmp) / f"m{i}"
            shutil.copytree(base, tree)
            apply(m, tree)
            start = time.perf_counter()
            passed, last = run_tests(tree, m.tests)
            shutil.rmtree(tree)
            verdict = "SURVIVED" if passed else "killed"
            elapsed = time.perf_counter() - start
            print(f"[{i:2}/{len(chosen)}] {verdict:8} {m.file:10} {m.name}  ({elapsed:.1f} s; {last})", flush=True)
            if passed:
                survivors.append(m)
    print(f"\nkilled {len(chosen) - len(survivors)} of {len(chosen)} mutations")
    for m in survivors:
        print(f"  survived: {m.file}: {m.name}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
