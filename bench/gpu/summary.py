"""The summary of a bench.gpu run: fast vs reference per FAT step (an epoch is these steps) and
per evaluation, the fraction of the bf16 matmul ceiling a FAT step reaches, GPU-busy fractions,
fused against one-after-another images/s per model, each kernel against its twin and the
reference, and which checks held. As JSON (gpu.json's
"summary") and as markdown tables (summary.md, for docs/gpu.md)."""
from __future__ import annotations


def _f(v, fmt="{:.2f}"):
    return "-" if v is None or isinstance(v, str) else fmt.format(v)


def summarize(doc: dict) -> tuple[dict, str]:
    st = doc["stages"]
    out, md = {"stages": {k: v["status"] for k, v in st.items()}}, []
    a = st.get("A", {}).get("data", {})
    gpu = (a.get("gpu") or {}).get("name") or a.get("cpu") or "?"
    flags = a.get("flags", {})
    md.append(f"GPU: {gpu}; torch {a.get('versions', {}).get('torch')}, triton {a.get('versions', {}).get('triton')}, "
              f"cuDNN {a.get('versions', {}).get('cudnn')}; TF32 at start: matmul {flags.get('tf32_matmul')}, "
              f"cuDNN {flags.get('tf32_cudnn')} (every row below records its own flags; fp32 rows ran with TF32 off)")
    ceiling = (a.get("matmul_bf16") or {}).get("TFLOP_per_s")
    md.append(f"ceilings: bf16 matmul {_f(ceiling, '{:.0f}')} TFLOP/s, copy {_f((a.get('copy') or {}).get('GB_per_s'), '{:.0f}')} GB/s")
    md.append("")
    md.append("stages: " + ", ".join(f"{k} {v}" for k, v in out["stages"].items()))
    checks = st.get("B", {}).get("data", {}).get("checks", {})
    out["checks"] = {k: v.get("ok") for k, v in checks.items() if "ok" in v}
    md.append("checks (B): " + (", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in out["checks"].items()) or "none"))
    md.append("")

    rows = list(st.get("C", {}).get("data", {}).get("rows", [])) + list(st.get("F", {}).get("data", {}).get("rows", []))
    ref = {r["workload"]: r.get("images_per_s") for r in rows if r.get("variant") == "reference fp32"}
    out["fat_step"] = []
    md.append("| FAT step (PGD-10) | variant | images/s | vs reference fp32 | GPU busy | TFLOP/s | of bf16 matmul |")
    md.append("|---|---|---|---|---|---|---|")
    for r in rows:
        ips = r.get("images_per_s")
        ratio = ips / ref[r["workload"]] if ips and ref.get(r["workload"]) else None
        out["fat_step"].append({"workload": r["workload"], "variant": r["variant"], "images_per_s": ips,
                                "vs_reference": ratio, "busy_fraction": r.get("busy_fraction"),
                                "fraction_of_bf16_matmul": r.get("fraction_of_bf16_matmul"),
                                "error": r.get("error") or r.get("skipped")})
        md.append(f"| {r['workload']} | {r['variant']} | {_f(ips, '{:.0f}')} | {_f(ratio)}x | {_f(r.get('busy_fraction'))} | "
                  f"{_f(r.get('TFLOP_per_s'), '{:.1f}')} | {_f(r.get('fraction_of_bf16_matmul'), '{:.1%}')} |"
                  + (f" {r.get('error') or r.get('skipped')}" if r.get("error") or r.get("skipped") else ""))
    md.append("")

    d = st.get("D", {}).get("data", {})
    drows = d.get("rows", [])
    dref = next((r.get("images_x_eps_per_s") for r in drows if r.get("variant") == "reference fp32"), None)
    out["eval"] = []
    md.append("| evaluation (clean + PGD-20, 2 eps) | images x eps / s | vs reference fp32 |")
    md.append("|---|---|---|")
    for r in drows:
        v = r.get("images_x_eps_per_s")
        ratio = v / dref if v and dref else None
        out["eval"].append({"variant": r["variant"], "images_x_eps_per_s": v, "vs_reference": ratio})
        md.append(f"| {r['variant']} | {_f(v, '{:.0f}')} | {_f(ratio)}x |")
    match = d.get("fp32_match", {}).get("match")
    out["eval_fp32_matches_reference"] = match
    md.append(f"fp32 evaluation matches the reference (class accuracies within one sample): {match}")
    md.append("")

    out["fused"] = []
    md.append("| fused grid points (G) | K | one after another, img/s per model | fused, img/s per model | ratio |")
    md.append("|---|---|---|---|---|")
    for r in st.get("G", {}).get("data", {}).get("rows", []):
        note = "out of memory" if r.get("oom") else r.get("skipped") or r.get("error")
        out["fused"].append({k: r.get(k) for k in ("workload", "k", "unfused_img_s_per_model",
                                                    "fused_img_s_per_model", "ratio")} | {"note": note})
        md.append(f"| {r['workload']} | {r['k']} | {_f(r.get('unfused_img_s_per_model'), '{:.0f}')} | "
                  f"{_f(r.get('fused_img_s_per_model'), '{:.0f}')} | {_f(r.get('ratio'))}x |" + (f" {note}" if note else ""))
    md.append("")

    out["kernels"] = []
    md.append("| kernel | dtype | Triton ms | twin ms | reference ms | Triton vs twin | vs reference | Triton GB/s | twin GB/s |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    for r in st.get("E", {}).get("data", {}).get("rows", []):
        out["kernels"].append({k: r.get(k) for k in ("op", "dtype", "triton_vs_twin", "triton_vs_reference",
                                                      "triton_GB_per_s", "error", "skipped")})
        md.append(f"| {r['op']} | {r['dtype']} | {_f(r.get('triton_ms'), '{:.3f}')} | {_f(r.get('twin_ms'), '{:.3f}')} | "
                  f"{_f(r.get('reference_ms'), '{:.3f}')} | {_f(r.get('triton_vs_twin'))}x | "
                  f"{_f(r.get('triton_vs_reference'))}x | {_f(r.get('triton_GB_per_s'), '{:.0f}')} | "
                  f"{_f(r.get('twin_GB_per_s'), '{:.0f}')} |" + (f" {r['error']}" if r.get("error") else ""))
    return out, "\n".join(md) + "\n"
