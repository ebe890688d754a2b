"""report.html: self-contained (figures as data URIs, no scripts, no network), opening with the
answer (per method and eps_test under the strongest attack: mean [95% interval] and the paired
difference against the base method), wide tables split; and rendered in a real headless
Chromium: every image decodes at its own size (800 px wide, not stretched), no console errors, no
horizontal scrolling at 1366 px, and the first screen of a 1920 x 1080 display holds the verdict
sentences, the captioned scatter under the strongest attack and the start of the answer table."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest

from fastfat.report import html as report_html
from fastfat.report import report
from fastfat.report.tables import Table
from test_report_seeds import ACC, T2, db  # noqa: F401 (the database fixture)


@pytest.fixture(scope="module")
def page(db, tmp_path_factory):   # noqa: F811
    out = str(tmp_path_factory.mktemp("html_out"))
    written = report.write_report(db, out)
    path = os.path.join(out, "report.html")
    assert path in written
    return path, open(path, encoding="utf-8").read()


def _ci(values):
    v = np.array(values, dtype=float)
    half = T2 * v.std(ddof=1) / np.sqrt(len(v))
    return f"{100 * v.mean():.1f} [{100 * (v.mean() - half):.1f}, {100 * (v.mean() + half):.1f}]"


def test_page_is_self_contained_and_opens_with_the_answer(page):
    _, text = page
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text), "no network, no local files"
    imgs = re.findall(r'<img src="([^"]+)"', text)
    assert imgs and all(s.startswith("data:image/png;base64,") for s in imgs)
    for s in imgs:   # each embedded figure is a whole PNG
        raw = base64.b64decode(s.split(",", 1)[1])
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[-8:-4] == b"IEND"
    # the answer comes first: before Table 1, under APGD (the strongest attack here), with the
    # fairness scatter right after it
    a, t1 = text.index('id="answer"'), text.index("Table 1")
    assert a < t1 and "Under <b>APGD" in text[a:t1]
    assert 'alt="fig_fairness_digits_cnn"' in text[a:t1]
    # FAT-Madry at eps_train 0.1 under APGD, last checkpoint, three seeds: avg and its interval,
    # and the paired difference against Madry (seed by seed), computed here by hand
    fat = [np.mean(ACC[("fat-madry", 0.5, 0.1, s, "last")]["apgd"]) for s in range(3)]
    madry = [np.mean(ACC[("madry", 0.0, 0.1, s, "last")]["apgd"]) for s in range(3)]
    row = next(r for r in re.findall(r"<tr>(.*?)</tr>", text[a:t1]) if "FAT" in r and ">0.1<" in r)
    cells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
    assert cells[2] == "3" and cells[3] == _ci(fat), cells
    assert cells[7] == _ci(np.array(fat) - np.array(madry)), cells
    assert cells[10] == "Madry", cells


def test_wide_tables_are_split_with_the_stub_repeated():
    t = Table(slug="w", title="W", caption="c", stub=["model", "method"],
              header=[[("FGSM", 8), ("PGD-20", 8)], [("var", 1), ("rob.acc", 1)] * 8], digits=[2] * 16,
              rows=[(["cnn", "Madry"], [1000.0 + i for i in range(16)], [False] * 16)])
    # each column about 7 * 7 + 14 = 63 px, the stub 49 + 56: all 16 fit in 1150 px, 8 in 700
    assert report_html.column_parts(t) == [list(range(16))]
    parts = report_html.column_parts(t, max_px=700)
    assert parts == [list(range(8)), list(range(8, 16))]   # cut where the attacks meet
    page = report_html.table_html(t, max_px=700)
    assert page.count("<table>") == 2 and page.count(">Madry<") == 2 and "part 2 of 2" in page
    narrow = report_html.column_parts(t, max_px=400)   # a group wider than a part is cut
    assert all(len(p) <= 4 for p in narrow) and sum(narrow, []) == list(range(16))


# ---------------------------------------------------------------------------------------------
# The browser: Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in,
# fd 4 out, NUL-separated JSON), stdlib only.

class _Chrome:
    def __init__(self, exe: str, profile: str):
        r_in, self._w = os.pipe()    # we write commands -> its fd 3
        self._r, w_out = os.pipe()   # its fd 4 -> we read
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(r_in, w_out, 3, 4), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, preexec_fn=lambda: (os.dup2(r_in, 3), os.dup2(w_out, 4)))
        os.close(r_in)
        os.close(w_out)
        self._buf, self._id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout=60.0):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self._next()
            if m.get("id") == self._id:
                assert "error" not in m, (method, m["error"])
                return m["result"]
            self.events.append(m)
        raise TimeoutError(method)

    def wait_event(self, name: str, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("method") == name for e in self.events):
                return
            self.events.append(self._next())
        raise TimeoutError(name)

    def _next(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI: chromium is required for the report.html browser test (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return exe


def _render(path: str, tmp_path) -> tuple[dict, dict, list]:
    """report.html at path in headless Chromium: (what a 1366 x 768 laptop screen shows, what a
    1920 x 1080 one shows, the console errors); its laptop screenshot is checked to be a PNG."""
    chrome = _Chrome(_chromium(), str(tmp_path / "profile"))
    try:
        target = chrome.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = chrome.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            chrome.send(f"{domain}.enable", session=s)
        chrome.send("Emulation.setDeviceMetricsOverride",   # a laptop screen
                    {"width": 1366, "height": 768, "deviceScaleFactor": 1, "mobile": False}, session=s)
        chrome.send("Page.navigate", {"url": "file://" + os.path.abspath(path)}, session=s)
        chrome.wait_event("Page.loadEventFired")
        js = ("JSON.stringify({imgs: Array.from(document.images).map(i => [i.complete, i.naturalWidth,"
              " i.naturalHeight, i.getBoundingClientRect().width, i.getBoundingClientRect().height]),"
              " scroll: document.documentElement.scrollWidth, view: window.innerWidth,"
              " first: document.elementFromPoint(400, 300) ? 1 : 0,"
              " answerTop: document.getElementById('answer').getBoundingClientRect().top,"
              " verdicts: document.getElementById('verdicts').getBoundingClientRect().bottom,"
              " verdictText: document.getElementById('verdicts').innerText,"
              " scatter: (f => [f.getBoundingClientRect().bottom, f.querySelector('figcaption').innerText])"
              "(document.querySelector('figure[id^=fig_fairness_]')),"
              " table: document.querySelector('#answer ~ table').getBoundingClientRect().top})")

        def look():
            return json.loads(chrome.send("Runtime.evaluate", {"expression": js, "returnByValue": True},
                                          session=s)["result"]["value"])
        got = look()
        shot = chrome.send("Page.captureScreenshot", {"format": "png"}, session=s)["data"]
        chrome.send("Emulation.setDeviceMetricsOverride",   # a desktop screen
                    {"width": 1920, "height": 1080, "deviceScaleFactor": 1, "mobile": False}, session=s)
        wide = look()
    finally:
        chrome.close()
    png = tmp_path / "report.png"
    png.write_bytes(base64.b64decode(shot))
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    errors = [e for e in chrome.events
              if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    return got, wide, errors


def _check_screens(got: dict, wide: dict, errors: list) -> None:
    """What every report.html shows: images decoded at their own size (800 x 450, not squeezed or
    stretched), no horizontal scrolling at 1366 px, the answer on the laptop's first screen, and
    on a desktop's first screen the verdicts, the captioned scatter and the answer table's start."""
    assert got["imgs"] and all(done and w > 0 for done, w, *_ in got["imgs"]), got["imgs"]
    assert all((w, h) == (800, 450) and (sw, sh) == (800, 450) for _, w, h, sw, sh in got["imgs"]), got["imgs"]
    assert got["scroll"] <= got["view"], f"horizontal scrolling at 1366 px: {got}"
    assert got["answerTop"] < 768, "the answer starts on the first screen"
    assert max(wide["verdicts"], wide["scatter"][0]) < wide["table"] < 1080, wide   # beside or above each other
    assert "Error bars" in wide["scatter"][1]
    assert not errors, errors


def test_report_html_renders_in_headless_chromium(page, tmp_path):
    path, _ = page
    got, wide, errors = _render(path, tmp_path)
    _check_screens(got, wide, errors)
    assert "against Madry at eps_train 0.1" in wide["verdictText"] and "APGD" in wide["verdictText"]
    assert "APGD at eps_test 0.25" in wide["scatter"][1]


@pytest.mark.skipif(not os.environ.get("FASTFAT_DEMO_REPORT"),
                    reason="set FASTFAT_DEMO_REPORT to the main job's demo_report/report.html (README)")
def test_the_demo_report_in_headless_chromium(tmp_path):
    """The README's main job's own report.html (FASTFAT_DEMO_REPORT=demo_report/report.html after
    its quick start; an 8-minute run, so not in the default test run): the same screens, and its
    answer under APGD everywhere: the verdicts and the scatter name APGD, none names PGD-20."""
    got, wide, errors = _render(os.environ["FASTFAT_DEMO_REPORT"], tmp_path)
    _check_screens(got, wide, errors)
    assert "APGD" in wide["verdictText"] and "PGD-20" not in wide["verdictText"]
    assert "APGD at eps_test 0.2" in wide["scatter"][1] and "PGD-20" not in wide["scatter"][1]
