"""The README and docs/*.md stay true of the code: every function they name exists, every file and
link they name is in the repository, and they have no line-number links (those drift as soon as the
code moves)."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODULES = tuple(sorted(p.stem for p in ROOT.glob("*.py")))   # every top-level module, so none can be missed
# verl's config keys, which read like attributes of data.py
VERL_KEYS = {"data.train_batch_size", "data.max_response_length", "data.filter_overlong_prompts",
             "data.train_files", "data.val_files"}
# `config.json`, `clgrpo.py`: a file name, not a module attribute
FILE_EXTENSIONS = {"py", "sh", "json", "jsonl", "md", "png", "log", "pt", "safetensors", "tsv", "txt", "yaml"}


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def named_functions(text: str) -> set[str]:
    names = set(re.findall(r"`(?:python )?((?:%s)\.[A-Za-z_][\w.]*)" % "|".join(MODULES), text))
    return {n.rstrip(".") for n in names if n.rstrip(".").split(".")[1] not in FILE_EXTENSIONS} - VERL_KEYS


def test_the_patterns_find_the_references():
    readme = (ROOT / "README.md").read_text()
    assert len(named_functions(readme)) > 20
    assert "clgrpo" in MODULES and "vlm" in MODULES and "families" in MODULES
    assert not named_functions("`config.json`, `clgrpo.py --stage 2`, `data.train_batch_size=4`")
    assert named_functions("`config.float_in`") == {"config.float_in"}


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_named_function_exists(doc):
    missing = []
    for name in sorted(named_functions(doc.read_text())):
        module, *path = name.split(".")
        obj = importlib.import_module(module)
        for part in path:
            if not hasattr(obj, part):
                missing.append(name)
                break
            obj = getattr(obj, part)
    assert not missing, f"{doc_id(doc)} names functions that do not exist: {missing}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_every_named_file_and_link_exists(doc):
    text = doc.read_text()
    files = set(re.findall(r"`((?:tests|scripts|docs)/[\w./-]+\.(?:py|sh|json|md|png)|[\w-]+\.(?:py|sh))`", text))
    missing = sorted(f for f in files if not (ROOT / f).exists() and not (ROOT / "tests" / f).exists())
    assert not missing, f"{doc_id(doc)} names files that are not in the repository: {missing}"
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):   # markdown links and pictures
        if re.match(r"[a-z]+:", target):                 # http(s): outside the repository
            continue
        file, _, anchor = target.partition("#")
        linked = (doc.parent / file).resolve() if file else doc
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{doc_id(doc)} has links to nothing: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_no_line_number_links_and_no_outside_documents(doc):
    text = doc.read_text()
    assert not re.search(r"\]\([^)]*#L\d+", text), "line-number links drift: link the function instead"
    assert "DESIGN" not in text and "../shared" not in text


def test_the_code_cites_no_outside_document():
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*.sh"), *ROOT.glob("scripts/*.py")]:
        assert "DESIGN" not in path.read_text(), f"{path.name} cites a document outside the repository"
