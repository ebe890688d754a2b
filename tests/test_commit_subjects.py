"""Every commit after 71b2e04 has a subject of at most 72 characters, so `git log --oneline`
reads (issue 29); the history up to 71b2e04 stays as it is. A merge keeping git's default
subject ("Merge branch 'x' into main") passes whatever its length. Skips only outside a git
checkout of the project (e.g. an unpacked sdist)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 72
BASE = "71b2e043f9390b0ba1530d17bfc3a6cc3972a275"
# BASE's committer time: a shallow clone may not hold BASE, then "after" is by date
BASE_TIME = 1796512071
# the subjects git writes itself for a merge (fmt-merge-msg)
_NAMES = r"'[^']+'(?:(?:, | and )'[^']+')*"
DEFAULT_MERGE = re.compile(
    rf"Merge (?:(?:remote-tracking )?branch(?:es)?|tags?|commits?) {_NAMES}(?: of \S+)?(?: into \S+)?")


def too_long(commits: list[tuple[str, int, str]]) -> list[str]:
    """The commits (hash, number of parents, subject) whose subject is over LIMIT characters,
    leaving out merges with git's default subject; as 'hash (length): subject'."""
    return [f"{h[:10]} ({len(s)}): {s[:100]}" for h, parents, s in commits
            if len(s) > LIMIT and not (parents > 1 and DEFAULT_MERGE.fullmatch(s))]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)


def new_commits() -> list[tuple[str, int, str]]:
    """The commits on HEAD after BASE: (hash, number of parents, subject)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the commit subjects cannot be read")
    top = _git("rev-parse", "--show-toplevel")
    if top.returncode or os.path.realpath(top.stdout.strip()) != os.path.realpath(ROOT):
        pytest.skip(f"{ROOT} is not a git checkout of fastfat: no commit history to check")
    if _git("cat-file", "-e", f"{BASE}^{{commit}}").returncode == 0:
        scope = ["HEAD", f"^{BASE}"]
    else:   # shallow clone without BASE: the commits made after it
        scope = ["HEAD", f"--since={BASE_TIME + 1}"]
    out = _git("log", "--format=%H%x00%P%x00%s", *scope)
    assert out.returncode == 0, out.stderr
    commits = []
    for line in out.stdout.splitlines():
        h, parents, subject = line.split("\0", 2)
        commits.append((h, len(parents.split()), subject))
    return commits


def test_the_check_can_fail():
    long = "x" * (LIMIT + 1)
    assert too_long([("a" * 40, 1, "y" * LIMIT)]) == []
    assert len(too_long([("a" * 40, 1, long)])) == 1
    # a merge passes only with git's own subject
    default = "Merge branch '" + "b" * 80 + "' into main"
    assert too_long([("a" * 40, 2, default)]) == []
    assert too_long([("a" * 40, 2, "Merge remote-tracking branch 'origin/" + "b" * 80 + "'")]) == []
    assert len(too_long([("a" * 40, 2, "Merge branch 'x': " + long)])) == 1
    assert len(too_long([("a" * 40, 1, default)])) == 1


def test_new_commit_subjects_fit_72_characters():
    bad = too_long(new_commits())
    assert not bad, (f"commit subjects over {LIMIT} characters (put the detail in the body, after "
                     "a blank line):\n" + "\n".join(bad))
