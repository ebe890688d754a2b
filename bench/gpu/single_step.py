"""bench.gpu stage S: single-step training attacks on the device (bench.single_step): one FAT-Madry
training epoch with PGD-5, PGD-10, FGSM-RS and N-FGSM side by side, ResNet18 width 64 (the
paper's) and 16 at batch 128 in bf16, and each one's throughput relative to PGD-5. Not yet
measured on a GPU (docs/gpu.md); the CPU's ratios are in docs/fast.md."""
from __future__ import annotations


def stage_s(data: dict, device, sizes, clock, record, smoke: bool) -> str:
    """Rows {"workload", "attack", "epoch_s", "images_per_s", "vs_pgd5"} in data["rows"], one
    workload at a time while the stage's time allows. smoke: the tiny CPU workload."""
    from bench.single_step import GPU_WORKLOADS, QUICK_WORKLOADS, run_single_step_bench

    if smoke:
        workloads, repeats = {"resnet18-w4": QUICK_WORKLOADS["resnet18-w4"]}, 1
    else:   # the paper's ResNet18 first
        workloads, repeats = {w: GPU_WORKLOADS[w] for w in ("resnet18-w64", "resnet18-w16")}, 2
    amp = "off" if device.type == "cpu" else "bf16"
    data.update(amp=amp, repeats=repeats)
    rows = data.setdefault("rows", [])
    last = 0.0
    for name, w in workloads.items():
        if not clock.allows(last):
            rows.append({"workload": name, "skipped": "out of the stage's time"})
            record.save()
            continue
        import time
        t0 = time.perf_counter()
        # conv_bound=False: a profiler session per step (CUPTI's start-up each time) would cost
        # the window more than the epochs; `python -m bench.single_step --device cuda` has it
        rows.extend(run_single_step_bench(device, {name: w}, amp=amp, repeats=repeats, log=None,
                                          conv_bound=False)["results"])
        last = time.perf_counter() - t0
        record.save()
    return "ok"
