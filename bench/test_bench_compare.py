"""Smoke test of `python -m bench.compare`: the quick mode runs end to end and prints its
verdict lines in the agreed form, so the report cannot rot. Not a benchmark (skipped under
--benchmark-only); timings in quick mode mean nothing and are not asserted."""
from __future__ import annotations

import json
import re

from bench import compare


def test_compare_quick_runs_and_reports(tmp_path, capsys):
    out_json = tmp_path / "compare.json"
    assert compare.main(["--quick", "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"fat-epoch speedup: \d+\.\d\dx \(results (match|differ)\)", lines[-2]), lines[-2]
    assert re.fullmatch(r"eval speedup: \d+\.\d\dx \(results (match|differ)\)", lines[-1]), lines[-1]
    # the checks are real: both sides agree on this tiny workload too
    assert lines[-2].endswith("(results match)") and lines[-1].endswith("(results match)")
    result = json.loads(out_json.read_text())
    assert result["train"]["match"]["weights_close"] and result["eval"]["match"]["match"]
    assert len(result["train"]["match"]["losses"]) == 2


def test_compare_quick_with_bf16(tmp_path, capsys):
    """--amp bf16 adds the autocast rows and its line above the verdicts, which stay the fp32
    path's; bf16's own numbers are reported, never called a match."""
    out_json = tmp_path / "compare.json"
    assert compare.main(["--quick", "--amp", "bf16", "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("eval speedup:") and lines[-2].startswith("fat-epoch speedup:")
    assert re.fullmatch(r"with bf16 autocast: fat-epoch speedup \d+\.\d\dx, eval speedup \d+\.\d\dx "
                        r"\(results differ at bf16's rounding: .*\)", lines[-3]), lines[-3]
    result = json.loads(out_json.read_text())
    drift = result["train"]["bf16"]["drift"]
    assert len(drift["reference"]) == len(drift["fast+bf16"]) == 2
    assert drift["fast+bf16"][0] != drift["reference"][0]          # autocast really ran
    assert abs(drift["fast+bf16"][0] - drift["reference"][0]) < 1e-2 * drift["reference"][0]
