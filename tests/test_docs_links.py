"""The README and docs/ hold together: every relative link and #anchor in README.md and
docs/*.md resolves (GitHub's heading slugs), links within a page and links whose text wraps over
lines included, the pages the README's map names exist, every `fastfat` command quoted in a
shell block of the README (and of docs/) parses with the CLI's own parser (subcommand and flags,
without running anything), and every page or README section a `--help` text points to exists."""
from __future__ import annotations

import glob
import os
import re
import shlex
import unicodedata

import pytest

from fastfat.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Written by other parts of the project (not generated here): the README's map links them.
REQUIRED = {"docs/methods.md": "peer methods", "docs/autoattack.md": "AutoAttack",
            "docs/datasets.md": "data sets"}
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped (letters, digits,
    spaces, hyphens and underscores stay), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link's text stays
    text = text.replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading's anchor in a Markdown file, repeats numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for line in _headings(path):
        s = slug(line)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def _headings(path: str) -> list[str]:
    out, fenced = [], False
    for line in open(path, encoding="utf-8").read().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            out.append(m.group(1))
    return out


def links(path: str) -> list[str]:
    """Every link target of a page's prose; a link's text may wrap over lines."""
    return [m.group(1) for m in LINK.finditer("\n".join(_prose(open(path, encoding="utf-8").read())))]


def test_links_are_found_within_a_page_and_across_lines(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Top\n\nsee [the\nnext part](#no-such-part) and [top](#top)\n")
    assert links(str(page)) == ["#no-such-part", "#top"]
    assert "top" in anchors(str(page)) and "no-such-part" not in anchors(str(page))


def test_slug_follows_githubs_rules():
    assert slug("When points fuse") == "when-points-fuse"
    assert slug("Training K variants at once: fused grid points") == "training-k-variants-at-once-fused-grid-points"
    assert slug("CFA (`cfa-madry`, `cfa-trades`)") == "cfa-cfa-madry-cfa-trades"
    assert slug("Theory check: Section 5 in numbers") == "theory-check-section-5-in-numbers"
    assert slug("The API in ten lines") == "the-api-in-ten-lines"


def test_pages_the_readme_maps_exist():
    missing = [f"{p} ({what}; written by its own change, merged before this test runs)"
               for p, what in REQUIRED.items() if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, "missing docs pages: " + "; ".join(missing)
    readme = open(PAGES[0], encoding="utf-8").read()
    for page in glob.glob(os.path.join(ROOT, "docs", "*.md")):
        rel = os.path.relpath(page, ROOT)
        assert f"]({rel})" in readme, f"the README's map of docs/ does not link {rel}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_and_anchor_resolves(page):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # https:, mailto: ...: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not os.path.exists(dest):
            bad.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {os.path.relpath(dest, ROOT)}")
    assert not bad, f"{os.path.relpath(page, ROOT)}: " + "; ".join(bad)


SEPARATORS = {"&&", "||", ";", "|", "&"}


def shell_commands(path: str) -> list[list[str]]:
    """Each `fastfat ...` command in a page's sh/bash blocks (backslash continuations joined,
    comments dropped, split at && ; |), as its argument list."""
    out, lang, pending = [], None, ""
    for line in open(path, encoding="utf-8").read().splitlines():
        if FENCE.match(line.strip()):
            lang = None if lang is not None else (line.strip()[3:].strip() or "text")
            continue
        if lang not in ("sh", "bash", "shell"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lex = shlex.shlex(pending + line, posix=True, punctuation_chars=True)
        lex.whitespace_split, pending = True, ""
        words: list[str] = []
        for tok in list(lex) + [";"]:
            if tok in SEPARATORS:
                if words and os.path.basename(words[0]) == "fastfat":
                    out.append(words[1:])
                words = []
            else:
                words.append(tok)
    return out


COMMANDS = [(os.path.relpath(p, ROOT), argv) for p in PAGES for argv in shell_commands(p)]


def test_readme_has_commands_to_check():
    assert {argv[0] for page, argv in COMMANDS if page == "README.md"} >= {"sweep"}, COMMANDS


@pytest.mark.parametrize("page,argv", COMMANDS, ids=[f"{p}: {' '.join(a)}" for p, a in COMMANDS])
def test_quoted_command_parses(page, argv, capsys):
    """The README's commands (and the docs pages'): the CLI's parser takes the subcommand and
    every flag (argparse exits 2 on an unknown one) without running the work."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: `fastfat {' '.join(argv)}` does not parse (exit {e.code}): "
                    f"{capsys.readouterr().err.strip()}")


def test_the_dry_check_refuses_a_wrong_flag():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--grid", "demo", "--no-such-flag"])


def help_texts(parser=None, where: str = "fastfat") -> list[tuple[str, str]]:
    """(where, text) for every description, argument help and group title of the CLI, its
    subcommands included."""
    import argparse
    parser = parser or build_parser()
    out = [(where, parser.description or "")]
    for group in parser._action_groups:
        out.append((where, f"{group.title or ''} {group.description or ''}"))
    for action in parser._actions:
        out.append((f"{where} {'/'.join(action.option_strings) or action.dest}", action.help or ""))
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += help_texts(sub, f"{where} {name}")
    return out


def test_help_texts_point_only_to_what_exists():
    readme = anchors(PAGES[0])
    bad, seen = [], 0
    for where, text in help_texts():
        text = " ".join(text.split())
        for section in re.findall(r"README: ([^;)]+)", text):
            seen += 1
            if slug(section) not in readme:
                bad.append(f"{where}: README section {section!r} does not exist")
        for page, anchor in re.findall(r"(docs/[\w.-]+\.md)(?:#([\w-]+))?", text):
            seen += 1
            path = os.path.join(ROOT, page)
            if not os.path.exists(path):
                bad.append(f"{where}: {page} does not exist")
            elif anchor and anchor not in anchors(path):
                bad.append(f"{where}: {page} has no heading #{anchor}")
    assert seen, "the help texts point to no docs page: this check checks nothing"
    assert not bad, "; ".join(bad)
