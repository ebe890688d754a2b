"""Smoke test of `python -m bench.gpu --smoke`: every stage runs on the CPU at toy sizes (Triton
through its interpreter), gpu.json and summary.md are written, and the checks hold, so the
one command a GPU window runs cannot rot. Not a benchmark; its timings mean nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    # A fresh process: TRITON_INTERPRET=1 must come before triton's import, which this pytest
    # process may already have done.
    env = {k: v for k, v in os.environ.items() if k not in ("FASTFAT_KERNELS",)}
    env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_smoke_runs_every_stage(tmp_path):
    proc = _run(tmp_path / "gpu")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    status = {k: v["status"] for k, v in doc["stages"].items()}
    assert status == {"A": "ok", "B": "ok", "C": "ok", "D": "ok", "E": "ok", "G": "ok", "H": "ok", "S": "ok", "F": "skipped"}, status
    assert doc["smoke"] and doc["triton_note"] is None          # Triton ran, interpreted
    checks = doc["stages"]["B"]["data"]["checks"]
    for name in ("triton_active", "zero_fallbacks_eager_off", "zero_fallbacks_eager_bf16", "float64_match",
                 "fp32_first_step_tf32_off"):
        assert checks[name]["ok"] is True, (name, checks[name])
    rows = doc["stages"]["C"]["data"]["rows"]
    assert {r["variant"] for r in rows} == {"reference fp32", "fast fp32", "fast bf16", "fast bf16 + cudnn.benchmark"}
    assert all(r["images_per_s"] > 0 and "flags" in r for r in rows)
    assert doc["stages"]["D"]["data"]["fp32_match"]["match"]
    kernels = doc["stages"]["E"]["data"]["rows"]
    assert {r["op"].split(" C=")[0] for r in kernels} >= {"pgd_step", "FAT loss fwd", "FAT loss fwd+bwd",
                                                           "C&W margin fwd", "TRADES KL fwd+bwd"}
    assert all(r["triton_GB_per_s"] > 0 for r in kernels)
    fused = doc["stages"]["G"]["data"]["rows"]
    assert [(r["workload"], r["k"]) for r in fused] == [("resnet18-w4", 1), ("resnet18-w4", 2)]
    assert all(r["ratio"] > 0 for r in fused) and [r["k"] for r in doc["summary"]["fused"]] == [1, 2]
    single = doc["stages"]["S"]["data"]["rows"]
    assert [r["attack"] for r in single] == ["pgd-5", "pgd-10", "fgsm-rs", "n-fgsm"]
    assert all(r["vs_pgd5"] > 0 for r in single)
    assert doc["summary"]["checks"] and (tmp_path / "gpu" / "summary.md").read_text().count("|") > 50


def test_only_the_asked_stages_run_within_the_budget(tmp_path):
    """--stages picks stages; with no time left a stage's rows are skipped, not timed."""
    proc = _run(tmp_path / "gpu", "--stages", "AE", "--budget", "0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu" / "gpu.json").read_text())
    assert set(doc["stages"]) == {"A", "E"}
    assert doc["stages"]["E"]["data"]["rows"] and all("skipped" in r for r in doc["stages"]["E"]["data"]["rows"])


def test_a_failing_stage_is_recorded_and_the_file_rewritten(tmp_path):
    """run_stage: an exception becomes the stage's recorded error (type, message, traceback) and
    gpu.json is on disk after each stage; NaN becomes null (the file stays strict JSON)."""
    from bench.gpu.util import Record, run_stage

    rec = Record(str(tmp_path / "gpu.json"), {"smoke": True})

    def boom(data):
        data["partial"] = float("nan")
        raise RuntimeError("no GPU kernel image")
    entry = run_stage(rec, "X", "fails", boom)
    assert entry["status"] == "error" and entry["error"].startswith("RuntimeError: no GPU kernel image")
    run_stage(rec, "Y", "works", lambda data: data.update(v=1.5))
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["stages"]["X"]["status"] == "error" and doc["stages"]["X"]["data"]["partial"] is None
    assert doc["stages"]["Y"] == {**doc["stages"]["Y"], "status": "ok", "data": {"v": 1.5}}
