"""bench.gpu stage G: fused grid points on the device (bench.fused.run_fused_bench): K members
trained as one fused model against the same K trained one after another, images/s per model and
the ratio, for ResNet18 width 64 (the paper's ResNet18) and width 16 at batch 128 in bf16, K = 1,
2, 4, 8, 16 or until the memory runs out. The issue's target: >= 3x per model at K = 8."""
from __future__ import annotations

import time

KS = (1, 2, 4, 8, 16)
SMOKE_KS = (1, 2)
GROWTH = 2.5   # a K's time from the previous K's (twice the members, a little more memory traffic)


def stage_g(data: dict, device, sizes, clock, record, smoke: bool) -> str:
    """Rows {"workload", "k", "ratio", "fused_img_s_per_model", ...} (run_fused_bench's), one per
    K, in data["rows"]; a K that runs out of memory ends its workload ({"oom": True}); one that
    would not fit the stage's time is recorded skipped. smoke: the tiny CPU workload, K 1 and 2."""
    from bench.fused import GPU_WORKLOADS, QUICK_WORKLOADS, run_fused_bench

    if smoke:
        workloads, ks, steps, repeats = {"resnet18-w4": QUICK_WORKLOADS["resnet18-w4"]}, SMOKE_KS, 1, 1
    else:   # the paper's ResNet18 first: it is the one the target is about
        workloads, ks, steps, repeats = {w: GPU_WORKLOADS[w] for w in ("resnet18-w64", "resnet18-w16")}, KS, None, 2
    amp = "off" if device.type == "cpu" else "bf16"
    data.update(amp=amp, ks=list(ks), batch=128 if not smoke else workloads["resnet18-w4"]["batch_size"])
    rows = data.setdefault("rows", [])
    for name, over in workloads.items():
        last = 0.0
        for k in ks:
            if not clock.allows(GROWTH * last):
                rows.append({"workload": name, "k": k, "skipped": "out of the stage's time"})
                record.save()
                continue
            t0 = time.perf_counter()
            res = run_fused_bench(device, {name: over}, (k,), amp=amp, steps=steps, repeats=repeats, log=None)
            last = time.perf_counter() - t0
            rows.extend(res["results"])
            record.save()
            if res["results"][-1].get("oom"):
                break
    return "ok"
