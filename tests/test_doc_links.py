"""Each fact is written once and the other pages link to it, so every link between the README and
docs/ must land: the file exists and, for `#anchor`, one of its headings makes that anchor (GitHub's
rule: lower case, punctuation dropped, spaces to hyphens). And the pages stay within their bounds:
README <= 10 KB, docs/*.md <= 90 KB in all. No server needed."""
from __future__ import annotations

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: str) -> set[str]:
    """The anchors GitHub makes of a page's headings (outside fenced blocks)."""
    text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def links(path: str) -> list[str]:
    text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
    return [t for t in LINK.findall(text) if not t.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_link_lands(page):
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not os.path.exists(dest):
            broken.append(f"{target}: no file {os.path.relpath(dest, REPO)}")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{target}: no heading makes #{anchor} in {os.path.relpath(dest, REPO)}")
    assert not broken, "\n".join(broken)


def test_anchor_rule_follows_github():
    path = os.path.join(REPO, "docs", "usage.md")
    assert {"preprocessing-what-the-model-sees", "the-image-embedder-command"} <= anchors(path)


def test_pages_stay_within_their_bounds():
    """README a front door (<= 10 KB), docs/ each fact once (<= 90 KB in all): issue 35's bounds."""
    readme = os.path.getsize(PAGES[0])
    docs = sum(os.path.getsize(p) for p in PAGES[1:])
    assert readme <= 10_000, f"README.md is {readme} bytes; at most 10 000: depth belongs in docs/"
    assert docs <= 90_000, f"docs/*.md are {docs} bytes in all; at most 90 000: link, don't repeat"
