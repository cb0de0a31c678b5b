"""The README keeps the original's usage block as the interface we mirror: every flag it lists is cls.py's,
with the default and the choices it says; its test command is the one CI runs; and every file it and the docs
link to exists."""
import ast
import re

from conftest import ROOT
from recipe import make_parser
from utils.data import DATASETS

USAGE_LINE = re.compile(r"^--(\w+) +(.+?) \[default value is (.+?)\](?:\(choices=(\[.*\])\))?$")


def usage_block() -> list:
    """The README's usage block: [(flag, default as written, choices as written or None)]."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Usage", 1)[1].split("```")[1]
    lines = [line for line in block.splitlines() if line.startswith("--")]
    matches = [USAGE_LINE.match(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m]
    return [(m.group(1), m.group(3), m.group(4)) for m in matches]


def test_the_usage_block_lists_the_originals_flags_with_cls_pys_defaults_and_choices():
    actions = {a.dest: a for a in make_parser()._actions}
    usage = usage_block()
    assert [flag for flag, _, _ in usage] == ["data_name", "data_path", "backbone_type", "norm_type", "batch_size",
                                              "epochs"]  # the original's, in its order
    for flag, default, choices in usage:
        action = actions[flag]
        if flag == "data_path":  # no single default: each dataset's own
            assert action.default is None
            assert default == " for ".join([f"'{DATASETS['cifar10'].default_path}'", "CIFAR, "]) + \
                f"'{DATASETS['imagenet'].default_path}' for ImageNet"
        else:
            assert ast.literal_eval(default) == action.default, flag
        assert (ast.literal_eval(choices) if choices else None) == action.choices, flag


def test_the_readmes_test_command_is_the_one_ci_runs():
    command = "pip install -r requirements.txt pytest ruff && ruff check . && python -m pytest -q"
    assert command in (ROOT / "README.md").read_text()
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == command


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)|src=\"([^\"]+)\"")


def test_every_file_the_readme_and_the_docs_link_to_exists():
    # original-README.md is the original project's, verbatim: its links point into that project.
    pages = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "original-README.md")]
    links = [(page, target) for page in pages for m in LINK.finditer(page.read_text())
             for target in [m.group(1) or m.group(2)] if "://" not in target]
    assert len(links) > 20  # the pattern still finds the links
    missing = [f"{page.relative_to(ROOT)}: {target}" for page, target in links
               if not (page.parent / target).exists()]
    assert not missing, missing
