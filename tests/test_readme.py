"""The README stays true of the code: every function it names exists, every file it names is in
the repository, and it has no line-number links (they drift as soon as the code moves)."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MODULES = ("clgrpo", "dynamic_sampling", "vlm", "families", "checkpoints", "sft", "eval", "rewards", "data", "config",
           "charts", "toy", "cot_builder", "lora")
VERL_KEYS = ("data.train_batch_size", "data.max_response_length", "data.filter_overlong_prompts")  # verl's config


def test_every_named_function_exists():
    names = set(re.findall(r"`(?:python )?((?:%s)\.[A-Za-z_][\w.]*)" % "|".join(MODULES), README))
    assert len(names) > 20  # the pattern really finds the README's references
    missing = []
    for name in sorted(names - set(VERL_KEYS)):
        module, *path = name.rstrip(".").split(".")
        if path and path[-1] == "py":  # a file name such as `clgrpo.py`, not an attribute
            continue
        obj = importlib.import_module(module)
        for part in path:
            if not hasattr(obj, part):
                missing.append(name)
                break
            obj = getattr(obj, part)
    assert not missing, f"README names functions that do not exist: {missing}"


def test_every_named_file_exists():
    files = set(re.findall(r"`((?:tests|scripts)/[\w./-]+\.(?:py|sh|json)|[\w-]+\.(?:py|sh))`", README))
    assert files
    missing = sorted(f for f in files if not (ROOT / f).exists() and not (ROOT / "tests" / f).exists())
    assert not missing, f"README names files that are not in the repository: {missing}"


def test_no_line_number_links_and_no_outside_documents():
    assert not re.search(r"\]\([^)]*#L\d+", README), "line-number links drift: link the function instead"
    assert "DESIGN" not in README and "../shared" not in README
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*.sh"), *ROOT.glob("scripts/*.py")]:
        assert "DESIGN" not in path.read_text(), f"{path.name} cites a document outside the repository"
