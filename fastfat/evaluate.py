"""Class-wise evaluation: clean, FGSM, PGD-K, C&W-inf and AutoAttack (aa, apgd) at several eps_test.

For each test batch, each attack runs once over the batch repeated for every eps_test (per-sample
eps), so one pass of the data serves every radius. The start noise for (batch, attack, eps) comes
from a generator keyed by those indices (fastfat.seeding.eval_noise_seed), so the numbers do not
depend on how the work is batched and equal the reference's one-at-a-time evaluation.
AutoAttack (fastfat.autoattack) is seeded by the key of (batch, "aa", eps); fastfat's implementation runs
every eps of a batch at once, pyautoattack's (--aa-impl pyautoattack) one eps at a time.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import attacks, autoattack, kernels, metrics
from .config import EvalConfig, make_eval_config
from .data import build_loader, dataset_info
from .models.fold import fold_bn
from .runtime import (amp_dtype, autocast, chunk_size, progress_bar, resolve_device, set_backends, shard_count,
                      sharded)
from .seeding import eval_noise_seed
from .runfiles import load_model


def attack_schedule(attack: str, eps: float) -> tuple[str, int, float]:
    """(loss, steps, step size) of a canonical attack name at radius eps (the authors' settings)."""
    if attack == "fgsm":
        return "ce", 1, eps
    if attack == "cw":
        return "cw", 30, eps / 4
    return "ce", int(attack[3:]), eps / 4   # pgdK


def _start_noise(x: torch.Tensor, seed: int, batch: int, attack: str, eps_list) -> torch.Tensor:
    """U(-1, 1) start noise for x repeated once per eps, each block from its own keyed generator."""
    blocks = []
    for e in range(len(eps_list)):
        g = torch.Generator(device=x.device).manual_seed(eval_noise_seed(seed, batch, attack, e))
        blocks.append(attacks.uniform_noise(x, g))
    return torch.cat(blocks)


def _logits(model, x, device, ctx_dtype) -> torch.Tensor:
    """fp32 logits of x under no_grad, split over the CPU workers and into cache-sized slices as
    the attacks are (slices of a batch are independent in eval mode; the numbers do not change)."""
    def forward(sl):
        with torch.no_grad(), autocast(device, ctx_dtype):   # per thread, so set here
            return kernels.upcast(model(x[sl]))
    parts = sharded(forward, x.shape[0], shard_count(x), chunk_size(x))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
def _count(logits, y, num_classes, acc, key, pred=None):
    """Add a batch's per-class hits, counts and CE sums to acc[key]; hits from pred [N] when
    given (AutoAttack's own verdict per sample), else from the logits. A sample whose logits are
    not finite (an adversarial input the model overflows on) is never a hit: its output says
    nothing, and NaN's argmax would be class 0."""
    if pred is not None:
        pred = pred.masked_fill(~metrics.finite_rows(logits), -1)
    c, t = metrics.class_correct(logits if pred is None else pred, y, num_classes)
    _, loss_sum, _ = kernels.class_ce_stats(logits, y, num_classes)
    old = acc.get(key, (0, 0, 0))
    acc[key] = (old[0] + c, old[1] + t, old[2] + loss_sum.double())


def _repeated(cache: dict, key, values, n: int, device) -> torch.Tensor:
    """values[i] repeated n times each, [len(values) * n] float64 (so a float64 evaluation keeps
    eps exact; fp32 inputs round it once, as a float would); built once per key, since a
    host-to-device copy syncs."""
    if key not in cache:
        cache[key] = torch.tensor([v for v in values for _ in range(n)], dtype=torch.float64, device=device)
    return cache[key]


def _json_floats(values: list[float]) -> list[float | None]:
    """None for NaN/inf entries, which JSON cannot hold (files.atomic_write_json refuses them)."""
    return [v if math.isfinite(v) else None for v in values]


def evaluate(model: nn.Module, loader, cfg: EvalConfig, num_classes: int, *,
             device="cpu", amp: str | None = None, progress: bool = False,
             source: str | None = None) -> list[dict]:
    """Evaluate a model under cfg.attacks at cfg.eps_test. Returns one record per (attack, eps):
    {"attack", "eps", "class_acc": [C fractions], "avg_acc", "vcra" (raw variance), "worst_acc",
    "worst_k_acc", "worst_k", "nstd" (metrics.summarize), "class_loss": [C mean CE], "amp", "tf32"},
    clean first (attack "clean", eps 0), then attack-major, eps-minor (amp: None takes cfg.amp);
    aa / apgd records add "attack_settings" (fastfat.autoattack.settings: the implementation,
    its version and parameters). "class_count": [C test samples per class]; a class without samples (a
    --test-limit subset) has class_acc and class_loss None (JSON null), and the summaries are over
    the classes present; class_loss is None also where it is not finite (a diverged model).

    A model whose clean outputs on a batch are not finite is refused (UserError naming source,
    e.g. "checkpoint run/checkpoint.pt") before that batch is attacked; an adversarial example
    whose outputs are not finite counts as not robust (the attack broke the model there)."""
    # amp (None: cfg.amp, "off" by default: the paper evaluates in fp32) and TF32 (cfg.tf32, set
    # process-wide for CUDA) change the numbers, so every record says which were used.
    amp = cfg.amp if amp is None else amp
    device = torch.device(device)
    ctx_dtype = amp_dtype(amp, device)
    set_backends(device, tf32=cfg.tf32)
    model.eval()
    attacked = fold_bn(model, dtype=ctx_dtype) if cfg.fold_bn else model
    radii = {}   # per-sample eps and steps per batch size, for _repeated
    eps_list = list(cfg.eps_test)
    acc = {}
    bar = progress_bar(len(loader), "eval", progress)
    for b, (x, y) in enumerate(loader):
        clean = _logits(model, x, device, ctx_dtype)
        metrics.check_finite_logits(clean, "the test data" + (f" of {source}" if source else ""))
        _count(clean, y, num_classes, acc, ("clean", 0.0))
        n = y.numel()
        # torch.cat keeps x's layout (repeat would turn channels_last into NCHW)
        x_rep = torch.cat([x] * len(eps_list))
        y_rep = y.repeat(len(eps_list))
        eps_rep = _repeated(radii, ("eps", n), eps_list, n, x.device)
        aa_done = {}   # this batch's AutoAttack results (aa goes on from apgd's)
        for attack in cfg.attacks:
            if attack in autoattack.ATTACKS:
                _autoattack(attacked, x, y, attack, cfg, b, num_classes, acc, device, ctx_dtype, aa_done)
                continue
            loss, steps, _ = attack_schedule(attack, 1.0)
            alpha_rep = _repeated(radii, (attack, n), [attack_schedule(attack, e)[2] for e in eps_list], n,
                                  x.device)
            noise = _start_noise(x, cfg.seed, b, attack, eps_list)
            x_adv = attacks.pgd(attacked, x_rep, y_rep, eps_rep, alpha_rep, steps, loss=loss,
                                kappa=cfg.cw_kappa, noise=noise, amp=ctx_dtype, fold_bn=cfg.fold_bn)
            logits = _logits(attacked, x_adv, device, ctx_dtype)
            for i, e in enumerate(eps_list):
                _count(logits[i * n:(i + 1) * n], y, num_classes, acc, (attack, e))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    records = []
    for (attack, e), (correct, total, loss_sum) in acc.items():
        if not torch.equal(total, acc[("clean", 0.0)][1]):   # each sample counted once per record
            raise RuntimeError(f"{attack} at eps {e} counted {int(total.sum())} samples, the clean row "
                               f"{int(acc[('clean', 0.0)][1].sum())}")
        class_acc = (correct / total).tolist()   # NaN for a class absent from the test set
        records.append({"attack": attack, "eps": e, "class_acc": _json_floats(class_acc),
                        "class_count": [int(t) for t in total.tolist()],
                        **metrics.summarize(class_acc, cfg.worst_k),
                        "class_loss": _json_floats((loss_sum / total).tolist()), "amp": amp, "tf32": cfg.tf32})
        if attack in autoattack.ATTACKS:
            records[-1]["attack_settings"] = autoattack.settings(attack, num_classes, cfg.aa_impl)
    return records


def _autoattack(attacked, x, y, attack, cfg, b, num_classes, acc, device, ctx_dtype, done):
    """Count a batch under AutoAttack (aa | apgd) at each eps: robust per sample as the ensemble
    finds it, class loss on its adversarial examples. Seeded per (seed, batch, eps), the same for
    aa and apgd: apgd is then exactly aa's first two attacks, and never below aa per sample.
    cfg.aa_impl fastfat: every eps in one working batch, and aa goes on from apgd's result when
    both are asked for (apgd's run is exactly aa's first two attacks); pyautoattack: one eps at a
    time. done: this batch's fastfat results so far, by attack."""
    eps_list = list(cfg.eps_test)
    seeds = [eval_noise_seed(cfg.seed, b, "aa", i) for i in range(len(eps_list))]
    n = y.numel()
    if cfg.aa_impl == "fastfat":
        run = lambda a, after=None: autoattack.run_batch(attacked, x, y, a, eps_list, seeds, num_classes,
                                                         amp=ctx_dtype, after_apgd=after)
        if attack == "aa" and "apgd" in cfg.attacks:
            if "apgd" not in done:
                done["apgd"] = run("apgd")
            x_adv, pred = run("aa", done["apgd"])
        else:
            x_adv, pred = done[attack] if attack in done else run(attack)
        done[attack] = (x_adv, pred)
        runs = [(x_adv[i * n:(i + 1) * n], pred[i * n:(i + 1) * n]) for i in range(len(eps_list))]
    else:
        runs = [autoattack.run(attacked, x, y, attack, e, s, num_classes, amp=ctx_dtype, impl="pyautoattack")
                for e, s in zip(eps_list, seeds)]
    for e, (x_adv, pred) in zip(eps_list, runs):
        _count(_logits(attacked, x_adv.to(x.dtype), device, ctx_dtype), y, num_classes, acc,
               (attack, e), pred=pred)


# ---------------------------------------------------------------------------------------------
# Printing in the paper's layout

ATTACK_TITLES = {"clean": "clean", "fgsm": "FGSM", "cw": "C&W", "aa": "AA", "apgd": "APGD"}


def attack_title(attack: str) -> str:
    return ATTACK_TITLES.get(attack, attack.upper().replace("PGD", "PGD-"))


def eps_label(eps: float) -> str:
    """The decimal when it is short (0.25), else k/255 when eps is a whole number of 255ths."""
    if eps == 0 or abs(round(eps, 3) - eps) < 1e-12:
        return f"{eps:g}"
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


def table1_row(records: list[dict], label: str = "") -> str:
    """Header and one row in Table 1's layout: var (x10^-2) and rob.acc (%) per attack and eps_test."""
    rob = [r for r in records if r["attack"] != "clean"]
    head1 = ["" if not label else "run"] + [f"{attack_title(r['attack'])} {eps_label(r['eps'])}" for r in rob]
    cells = [label] + [f"{100 * r['vcra']:.2f} / {100 * r['avg_acc']:.2f}" for r in rob]
    clean = next((r for r in records if r["attack"] == "clean"), None)
    if clean is not None:
        head1.append("clean")
        cells.append(f"{100 * clean['vcra']:.2f} / {100 * clean['avg_acc']:.2f}")
    widths = [max(len(a), len(b)) for a, b in zip(head1, cells)]
    fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))
    return fmt(head1) + "\n" + fmt(["var / rob.acc" if label else ""] + ["" for _ in cells[1:]]).rstrip() \
        + "\n" + fmt(cells)


# ---------------------------------------------------------------------------------------------
# From a checkpoint

def make_test_loader(tcfg, ecfg: EvalConfig, device):
    """The test loader for a model trained with tcfg, evaluated as ecfg says (sequential, plain).

    The eval config's data_root and test subset (test_limit or test_per_class) win; else the
    training run's."""
    subset = ecfg if (ecfg.test_limit, ecfg.test_per_class) != (None, None) else tcfg
    return build_loader(ecfg.loader, tcfg.dataset, "test", data_root=ecfg.data_root or tcfg.data_root,
                        download=False, batch_size=ecfg.batch_size, device=device,
                        channels_last=tcfg.channels_last, limit=subset.test_limit,
                        per_class=subset.test_per_class)


def evaluate_checkpoint(checkpoint: str, cfg_overrides: dict, *, progress=True):
    """Load a checkpoint and evaluate it; returns (records, train config, eval config)."""
    model_device = resolve_device(cfg_overrides.get("device", "auto"))
    model, tcfg = load_model(checkpoint, model_device)
    ecfg = make_eval_config(tcfg.preset or None, **cfg_overrides)
    info = dataset_info(tcfg.dataset)
    records = evaluate(model, make_test_loader(tcfg, ecfg, model_device), ecfg, info.num_classes,
                       device=model_device, progress=progress, source=f"checkpoint {checkpoint}")
    return records, tcfg, ecfg
