"""The documentation stays true to the code: every flag of every command is in its docs page's flag table with the
parser's default, and every relative link of the README and of ``docs/`` reaches an existing file and heading."""
from __future__ import annotations

import argparse
import os
import re
from typing import Callable, Dict, List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parsers() -> Dict[str, Callable[[], argparse.ArgumentParser]]:
    from nnunet_pgl.demo.cli import build_parser as demo
    from nnunet_pgl.evaluation.compare import build_parser as compare
    from nnunet_pgl.evaluation.probe_cli import build_parser as probe
    from nnunet_pgl.pretraining.cli import build_parser as pretrain
    from nnunet_pgl.trainers.transfer import build_parser as transfer
    return {"pgl_pretrain.md": pretrain, "probe.md": probe, "pgl_compare.md": compare, "workflows.md": transfer,
            "pgl_demo.md": demo}


def _rows(text: str) -> List[List[str]]:
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))] for line in text.splitlines()
            if line.startswith("| `")]  # "\|" inside a cell is a literal bar


def _shown(default: object) -> str:
    return " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


@pytest.mark.parametrize("page", ["pgl_pretrain.md", "probe.md", "pgl_compare.md", "workflows.md", "pgl_demo.md"])
def test_every_flag_is_in_its_table_with_the_parsers_default(page: str) -> None:
    with open(os.path.join(ROOT, "docs", page), encoding="utf-8") as f:
        rows = _rows(f.read())
    for action in _parsers()[page]()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = action.option_strings or [action.metavar or action.dest]
        row = next((r for r in rows if any(re.search("`" + re.escape(n) + "[ `]", r[0]) for n in names)), None)
        assert row is not None, f"docs/{page}: no table row for {names[0]}"
        d = action.default
        if d is not None and d is not False and d != [] and not action.required:
            assert _shown(d) in row[1], f"docs/{page}: {names[0]} shows default {row[1]!r}, the parser has {d!r}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: str) -> set:
    out, in_code = set(), False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                in_code = not in_code
            m = None if in_code else re.match(r"#+\s+(.*)", line)
            if m:
                out.add(_slug(m.group(1)))
    return out


def test_relative_links_reach_files_and_headings() -> None:
    pages = [os.path.join(ROOT, "README.md")] + [os.path.join(ROOT, "docs", f)
                                                  for f in sorted(os.listdir(os.path.join(ROOT, "docs")))]
    checked = 0
    for page in pages:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            assert os.path.exists(dest), f"{os.path.relpath(page, ROOT)}: link {target} leads nowhere"
            if anchor:
                assert anchor in _anchors(dest), f"{os.path.relpath(page, ROOT)}: no heading for {target}"
            checked += 1
    assert checked > 10
