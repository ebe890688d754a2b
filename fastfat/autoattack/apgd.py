"""APGD-CE and APGD-T (Croce & Hein 2020, pyautoattack 0.2.0's l_inf algorithm): step size 2 eps
halved at checkpoints where the loss oscillated or stalled, momentum 0.75, restart from the best
point; every eps_test and every target class of a sample in one working batch, and a sample out of
it as soon as it is fooled (its verdict is final)."""
from __future__ import annotations

import torch

from .common import ce_loss, dlr_loss_targeted, view_rows

MOMENTUM = 0.75   # pyautoattack's fixed momentum (its rho is the oscillation threshold)


def schedule(n_iter: int) -> tuple[int, int, int]:
    """(first checkpoint, minimal checkpoint gap, gap decrease) in iterations, as pyautoattack's."""
    return max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)


def start_point(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """pyautoattack's l_inf start: x + eps * t / max|t| per row (t: U(-1, 1) noise), in the box."""
    e = view_rows(eps, x)
    norm = t.abs().reshape(t.shape[0], -1).max(1)[0]
    return (x + e * torch.ones_like(x) * (t / (view_rows(norm, t) + 1e-12))).clamp(0., 1.)


def run(logits_fn, x, y, eps, x_start, loss_fn, loss_args=(), *, n_iter: int, rho: float,
        owner: torch.Tensor | None = None, drop: bool | None = None) -> dict:
    """One APGD run per row from x_start, maximising loss_fn(logits, y, *loss_args) [R].

    x, x_start [R, C, H, W]; y [R]; eps [R] pixel units; loss_args [R, ...] tensors. owner [R]
    int64: the sample each row attacks (APGD-T: 9 rows a sample); with drop, all rows of a sample
    leave the working batch once one of them is fooled (default: drop on the CPU; on CUDA the batch
    stays whole so that nothing syncs with the host). The arithmetic per row is pyautoattack's
    attack_single_run, op for op (the step size and the loss history in fp32 as there), so in
    float64 without drop its iterates are reproduced exactly. Returns {"fooled" [R] bool,
    "x_adv" [R, C, H, W] (the fooled iterate of fooled rows: the last without drop, the first
    with; x_start elsewhere), and, without drop, "x_best", "loss_best" (the highest-loss
    iterate and its loss)}."""
    R = x.shape[0]
    drop = x.device.type == "cpu" if drop is None else drop
    owner = torch.arange(R, device=x.device) if owner is None else owner
    k, n_iter_min, size_decr = schedule(n_iter)
    out_adv, out_fooled = x_start.clone(), torch.zeros(R, dtype=torch.bool, device=x.device)

    s = dict(x=x, y=y, eps=view_rows(eps, x), args=list(loss_args), row=torch.arange(R, device=x.device),
             owner=owner)
    s["x_adv"] = x_start.clone()
    logits, loss, grad = logits_fn.loss_grad(s["x_adv"], loss_fn, y, *s["args"])
    s["grad"], s["x_best"], s["grad_best"], s["loss_best"] = grad, s["x_adv"].clone(), grad.clone(), loss.clone()
    s["step"] = (2. * eps).float().view(-1, *([1] * (x.dim() - 1)))   # fp32, as pyautoattack's
    s["x_old"] = s["x_adv"].clone()
    s["loss_steps"] = torch.zeros(n_iter, R, device=x.device)          # fp32, as pyautoattack's
    s["loss_last_check"] = loss.clone()
    s["reduced_last_check"] = torch.ones_like(loss)

    def record(logits, s):
        """Mark the rows fooled at s["x_adv"]; with drop, return s without their samples' rows."""
        fooled = logits.argmax(1) != s["y"]
        if not drop:
            out_adv[s["row"]] = torch.where(view_rows(fooled, x), s["x_adv"], out_adv[s["row"]])
            out_fooled[s["row"]] |= fooled
            return s
        if not fooled.any():
            return s
        out_adv[s["row"][fooled]] = s["x_adv"][fooled]
        out_fooled[s["row"][fooled]] = True
        done = torch.zeros(int(owner.max()) + 1, dtype=torch.bool, device=x.device)
        done[s["owner"][fooled]] = True
        keep = ~done[s["owner"]]
        return {key: ([a[keep] for a in v] if key == "args" else v[:, keep] if key == "loss_steps"
                      else v[keep]) for key, v in s.items()}

    s = record(logits, s)
    counter = 0
    for i in range(n_iter):
        if drop and s["x"].shape[0] == 0:
            break
        with torch.no_grad():
            xs, e, x_adv = s["x"], s["eps"], s["x_adv"]
            grad2 = x_adv - s["x_old"]
            s["x_old"] = x_adv.clone()
            a = MOMENTUM if i > 0 else 1.0
            x1 = x_adv + s["step"].to(x.dtype) * torch.sign(s["grad"])
            x1 = torch.clamp(torch.min(torch.max(x1, xs - e), xs + e), 0.0, 1.0)
            x1 = torch.clamp(torch.min(torch.max(x_adv + (x1 - x_adv) * a + grad2 * (1 - a), xs - e), xs + e),
                             0.0, 1.0)
            s["x_adv"] = x1
        logits, s["loss"], s["grad"] = logits_fn.loss_grad(s["x_adv"], loss_fn, s["y"], *s["args"])
        s = record(logits, s)   # on the evaluated point, before a checkpoint may reset it
        loss, grad = s.pop("loss"), s["grad"]
        with torch.no_grad():
            s["loss_steps"][i] = loss
            better = loss > s["loss_best"]
            rows = view_rows(better, x)
            s["x_best"] = torch.where(rows, s["x_adv"], s["x_best"])
            s["grad_best"] = torch.where(rows, grad, s["grad_best"])
            s["loss_best"] = torch.where(better, loss, s["loss_best"])
            counter += 1
            if counter == k:
                _checkpoint(s, i, k, rho, loss.dtype)
                k = max(k - size_decr, n_iter_min)
                counter = 0
    res = {"fooled": out_fooled, "x_adv": out_adv}
    if not drop:
        res.update(x_best=s["x_best"], loss_best=s["loss_best"])
    return res


def _checkpoint(s: dict, i: int, k: int, rho: float, loss_dtype: torch.dtype) -> None:
    """APGD's step-size checkpoint after iteration i, in place on the run's state s: halve the
    step (and restart from the best point) where the loss rose in at most rho of the last k
    steps, or where the last checkpoint did not halve it and the best loss has not improved since."""
    steps = s["loss_steps"]
    rises = sum((steps[i - c] > steps[i - c - 1]).float() for c in range(k))
    osc = (rises <= k * rho * torch.ones_like(rises)).float()
    no_impr = (1. - s["reduced_last_check"]) * (s["loss_last_check"] >= s["loss_best"]).float()
    osc = torch.max(osc, no_impr.to(osc.dtype))
    s["reduced_last_check"] = osc.to(loss_dtype)
    s["loss_last_check"] = s["loss_best"].clone()
    rows = view_rows(osc > 0, s["x_adv"])
    s["step"] = torch.where(rows, s["step"] / 2.0, s["step"])
    s["x_adv"] = torch.where(rows, s["x_best"], s["x_adv"])
    s["grad"] = torch.where(rows, s["grad_best"], s["grad"])


def _noise(rng, shape) -> torch.Tensor:
    """U(-1, 1) start noise [N, *shape] in fp32, pyautoattack's numbers (2 * rand - 1 from its
    reseeded stream: common.Rng.stream)."""
    return 2 * rng.stream(shape) - 1


def apgd_ce(logits_fn, x, y, eps, *, rng, n_iter: int = 100, rho: float = 0.75) -> torch.Tensor:
    """APGD on the cross-entropy: x [N, C, H, W], y [N], eps [N] -> x_adv [N, C, H, W] (the fooling
    iterate of each fooled sample, x elsewhere); start noise from rng (common.Rng)."""
    start = start_point(x, eps, _noise(rng, x.shape[1:]))
    r = run(logits_fn, x, y, eps, start, ce_loss, n_iter=n_iter, rho=rho)
    return torch.where(view_rows(r["fooled"], x), r["x_adv"], x)


def targets_of(clean_logits: torch.Tensor, n_target_classes: int) -> torch.Tensor:
    """[N, T]: the classes with the 2nd, 3rd, ... (T+1)th largest clean logit, pyautoattack's
    target order (its target_class 2 .. T + 1)."""
    order = clean_logits.sort(dim=1)[1]
    return order[:, [order.shape[1] - t for t in range(2, n_target_classes + 2)]]


def apgd_t(logits_fn, x, y, eps, *, rng, n_iter: int = 100, rho: float = 0.75,
           n_target_classes: int = 9) -> torch.Tensor:
    """APGD on the targeted DLR loss towards each of the n_target_classes most likely other
    classes (one run per target, one restart): all targets of all samples in one working batch, a
    sample's runs stopped once one of them fooled it. x [N, C, H, W], y [N], eps [N] -> x_adv."""
    n, t = x.shape[0], n_target_classes
    with torch.no_grad():
        targets = targets_of(logits_fn(x), t)
    owner = torch.arange(n, device=x.device).repeat_interleave(t)
    xr, er = x[owner], eps[owner]
    # the first target's starts are pyautoattack's (its first draw after reseeding); the other
    # targets' come next in the same stream (pyautoattack's depend on who the earlier ones fooled)
    noise = torch.cat([_noise(rng, (1, *x.shape[1:])), _noise(rng, (t - 1, *x.shape[1:]))], 1)
    start = start_point(xr, er, noise.flatten(0, 1))
    r = run(logits_fn, xr, y[owner], er, start, dlr_loss_targeted, (targets.reshape(-1),),
            n_iter=n_iter, rho=rho, owner=owner)
    fooled = r["fooled"].view(n, t)
    first = fooled.float().argmax(1)                       # the first target that fooled it
    adv = r["x_adv"].reshape(n, t, *x.shape[1:])[torch.arange(n, device=x.device), first]
    return torch.where(view_rows(fooled.any(1), x), adv, x)
