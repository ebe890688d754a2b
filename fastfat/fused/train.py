"""The fused training step and epoch: K compatible grid points trained as one FusedModel.

Each member keeps its own config (eps_train, step size, lambda, beta, VCAR mode, seed) and draws
the same random numbers as its unfused run: its initial weights (build_for_config), its loader
(batch order and augmentation from its seed) and its attack start noise
(epoch_generator(seed, epoch, "attack")). The step is one attack on the K x B images (per-member
radii as per-sample radii), one train-mode forward, the sum of the members' losses (each from
its own MethodState, the unfused Trainer's code path; the sum gives each member exactly its
own gradient) and one SGD step (SGD is elementwise, so one optimizer over the stacked parameters
is K optimizers when lr, momentum and weight decay agree).
"""
from __future__ import annotations

import time

import torch

from .. import attacks, methods
from ..config import TrainConfig
from ..config_dict import to_dict
from ..errors import UserError
from ..runtime import autocast, progress_bar, synchronize
from ..seeding import epoch_generator
from ..runfiles import build_for_config
from ..train import NonFiniteLoss, StepOut, Trainer, check_finite, check_model, make_optimizer, warmup_lam
from .model import FusedModel, fuse_models, split_models

# Training fields that may differ between members: they enter only the member's own attack
# radius/step, loss, random streams, or evaluation. Every other field must agree.
PER_MEMBER = ("seed", "eps_train", "step_size", "single_step_size", "lam", "beta", "vcar_mode", "superclass", "method",
              "preset", "test_limit", "test_per_class", "download")


def alone_reason(cfg: TrainConfig) -> str | None:
    """Why a point cannot share a fused group, or None: a method without a fusion family (the
    registry's Method.alone says why; the peer methods), checkpoint selection on a validation split (train() holds the split out and writes best.pt;
    a fused group trains on the whole training set and writes neither), or a start from another
    run's weights (init_from, which a fused group does not load), a teacher, or an attack on
    batch statistics (attack_bn "train": BN statistics over the K members' whole batch would
    mix the members)."""
    if methods.family(cfg.method) is None:
        return f"method {cfg.method} does not fuse ({methods.BY_NAME[cfg.method].alone})"
    if cfg.val_per_class is not None:
        return "val_per_class (checkpoint selection on a validation split) does not fuse"
    if cfg.init_from is not None:
        return "init_from (a start from another run's weights) does not fuse"
    if cfg.teacher is not None:
        return "teacher (distillation from another run) does not fuse"
    if cfg.attack_bn != "eval":
        return "attack_bn train (an attack on batch statistics) does not fuse"
    if cfg.guard != "off":
        return f"co_guard {cfg.guard} (a per-run score of every epoch) does not fuse"
    return None


def fuse_key(cfg: TrainConfig) -> tuple:
    """Points with equal keys can train as one fused group: every field but PER_MEMBER, and the
    method's fusion family (methods.family: madry with fat-madry; trades, fat-trades and natural
    each on their own).
    A point that cannot fuse (alone_reason) keys on its whole config, so plan_groups leaves it
    alone and a sweep trains it unfused."""
    d = to_dict(cfg)
    if alone_reason(cfg) is not None:
        return ("alone", cfg.method) + tuple((k, repr(v)) for k, v in sorted(d.items()))
    return (methods.family(cfg.method),) + tuple((k, repr(v)) for k, v in sorted(d.items()) if k not in PER_MEMBER)


def check_fusable(cfgs: list[TrainConfig]) -> None:
    """UserError, naming the first field that differs, unless cfgs can train as one group."""
    if not cfgs:
        raise UserError("a fused group needs at least one grid point")
    alone = next((r for r in map(alone_reason, cfgs) if r is not None), None)
    if alone is not None:
        raise UserError(f"{alone}: train it unfused (fuse = 1)")
    if cfgs[0].amp == "fp16":
        raise UserError("fp16 AMP cannot fuse: its loss scaler skips steps for the whole group; "
                        "use --amp bf16 or off")
    ref = fuse_key(cfgs[0])
    for i, c in enumerate(cfgs[1:], 1):
        key = fuse_key(c)
        if key != ref:
            why = (f"method {c.method} does not fuse with {cfgs[0].method}" if key[0] != ref[0] else
                   next(f"{a[0]} differs ({a[1]} vs {b[1]})" for a, b in zip(ref[1:], key[1:]) if a != b))
            raise UserError(f"grid point {i} cannot join a fused group with point 0: {why}")


class FusedTrainer(Trainer):
    """A Trainer over a FusedModel of K members (cfgs[k] is member k's config). The optimizer,
    AMP, attack objective, forwards and the BN-folded attack copy are the Trainer's, built from
    cfgs[0] (the fields they read, and the fusion family, agree within a group); each member's
    loss is its own MethodState's."""

    def __init__(self, cfgs: list[TrainConfig], model: FusedModel, device: torch.device | str = "cpu"):
        check_fusable(cfgs)
        if model.k != len(cfgs):
            raise ValueError(f"{len(cfgs)} configs for a fused model of {model.k} members")
        super().__init__(cfgs[0], model, device)
        self.cfgs, self.k = list(cfgs), len(cfgs)
        # each member's training (its loss, and lambda for the next step: warm-up sets it);
        # member 0's is the Trainer's own
        self.states = [self.method_state] + [methods.build(c, self.num_classes, self.device) for c in cfgs[1:]]
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def member_radii(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, alpha) per row of a stacked batch of n samples per member: [n*K] float64."""
        if n not in self._rows:
            row = lambda vals: torch.tensor(vals, dtype=torch.float64, device=self.device).repeat(n)
            self._rows[n] = (row([c.eps_train for c in self.cfgs]), row([c.alpha() for c in self.cfgs]))
        return self._rows[n]

    def adversarial(self, x, y, generators=None) -> torch.Tensor:
        """The members' training attacks at once on the stacked batch x [N*K, C, H, W], y [N*K];
        member k's start noise drawn from generators[k] exactly as its unfused pgd draws it."""
        gens = generators if generators is not None else [None] * self.k
        single = self.cfg.train_attack in attacks.SINGLE_STEP   # a uniform start whatever the objective
        noise = self.model.stack([attacks.start_noise(xk, self.attack_loss, True, g, single)
                                  for xk, g in zip(self.model.unstack(x), gens)])
        eps, alpha = self.member_radii(x.shape[0] // self.k)
        return attacks.pgd(self.attack_model(), x, y, eps, alpha, loss=self.attack_loss,
                           noise=noise, amp=self.amp, fold_bn=self.cfg.fold_bn,
                           **self.method_state.attack_args(eps))

    def member_losses(self, x, y, x_adv) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses [K], vcars [K]): each member's MethodState.loss on its rows; model in train mode."""
        n = x.shape[0] // self.k
        split = lambda logits: logits.view(n, self.k, -1).transpose(0, 1).contiguous()   # [K, N, classes]
        ys = y.view(n, self.k).t().contiguous()
        adversarial = self.method_state.adversarial
        with autocast(self.device, self.amp):
            if not adversarial:
                nat = split(self.forward(x))
                outs = [s.loss(ys[k], None, nat[k]) for k, s in enumerate(self.states)]
            else:
                adv = split(self.forward(x_adv))
                nat = split(self.forward(x)) if self.method_state.natural_forward else [None] * self.k
        if adversarial:
            outs = [s.loss(ys[k], adv[k], nat[k]) for k, s in enumerate(self.states)]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    def train_step(self, x, y, generators=None) -> StepOut:
        """One SGD step of every member on the stacked batch (x [N*K, C, H, W], y [N*K], see
        FusedModel.stack); generators: the K members' attack generators. StepOut's loss and
        vcar are [K] (per member, detached)."""
        x_adv = self.adversarial(x, y, generators) if self.method_state.adversarial else None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, vcars = self.member_losses(x, y, x_adv)
        losses.sum().backward()   # d(sum)/d(loss_k) = 1: each member gets exactly its own gradient
        if self.cfg.clip_grad_norm is not None:
            self.clip_members(self.cfg.clip_grad_norm)
        self.optimizer.step()
        return StepOut(losses.detach(), vcars.detach())

    @torch.no_grad()
    def clip_members(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ for each member alone, as its unfused step clips: member
        k's gradient (its slice of every parameter's) scaled to L2 norm <= max_norm over all of
        its parameters. Returns the members' norms before clipping [K]; no host sync."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        parts = [g.unflatten(0, (self.k, -1)) for g in grads]            # views [K, ...]
        norms = torch.stack([torch.linalg.vector_norm(p, dim=tuple(range(1, p.dim()))) for p in parts])
        total = torch.linalg.vector_norm(norms, dim=0)                    # [K]
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in parts:
            p.mul_(coef.view(self.k, *[1] * (p.dim() - 1)))
        return total


# ---------------------------------------------------------------------------------------------
# Members in and out of a group: the state an unfused Trainer of the member's config would hold

def assemble(cfgs: list[TrainConfig], snapshots: list[dict | None], device) -> FusedTrainer:
    """A FusedTrainer of the members: each built as the unfused run builds it (build_for_config:
    its seed's initial weights) and, where given, loaded from its snapshot {"model",
    "optimizer"} (state dicts as in its checkpoint); momentum buffers stacked like the weights."""
    device = torch.device(device)
    models, bufs = [], []
    for cfg, snap in zip(cfgs, snapshots):
        model = build_for_config(cfg, device)
        opt = make_optimizer(cfg, model.parameters())
        if snap is not None:
            model.load_state_dict(snap["model"])
            opt.load_state_dict(snap["optimizer"])
        models.append(model)
        bufs.append([opt.state.get(p, {}).get("momentum_buffer") for p in model.parameters()])
    trainer = FusedTrainer(cfgs, fuse_models(models), device)
    for i, p in enumerate(trainer.model.parameters()):
        parts = [b[i] for b in bufs]
        if any(t is not None for t in parts):   # a fresh member's buffer is 0: momentum * 0 + g = g
            zero = next(t for t in parts if t is not None)
            trainer.optimizer.state[p]["momentum_buffer"] = torch.cat(
                [t if t is not None else torch.zeros_like(zero) for t in parts], 0)
    return trainer


def snapshots(trainer: FusedTrainer) -> list[dict]:
    """Each member's {"model", "optimizer"} state dicts, exactly as an unfused Trainer of its
    config would save them (its own SGD, the current lr, its slice of the momentum buffers)."""
    models = split_models(trainer.model)
    fused_params = list(trainer.model.parameters())
    lr = trainer.optimizer.param_groups[0]["lr"]
    out = []
    for k, (cfg, model) in enumerate(zip(trainer.cfgs, models)):
        opt = make_optimizer(cfg, model.parameters())
        for g in opt.param_groups:
            g["lr"] = lr
        for p, fp in zip(model.parameters(), fused_params):
            buf = trainer.optimizer.state.get(fp, {}).get("momentum_buffer")
            if buf is not None:
                opt.state[p]["momentum_buffer"] = buf.chunk(trainer.k, 0)[k].clone()
        out.append({"model": model.state_dict(), "optimizer": opt.state_dict()})
    return out


# ---------------------------------------------------------------------------------------------
# One epoch

def fused_epoch(trainer: FusedTrainer, loaders: list, epoch: int, *, progress: bool = False,
                position: int = 0) -> tuple[list[dict], list[str | None]]:
    """One epoch (0-based) of every member: member k's loader, attack generator and lambda
    warm-up set for the epoch as its unfused train_epoch sets them. Returns (rows, errors), one
    per member: the log row train_epoch would write ("seconds" is the group's wall time,
    "images_per_s" the member's own images over it), and None or the NonFiniteLoss message
    train_epoch would raise (its loss NaN/inf at the same check points: every 5 steps with a
    progress bar, and at the end; or its weights after the last step, check_model). A member's
    non-finite values stay in its own channels, so the others are unaffected."""
    k, device = trainer.k, trainer.device
    lr = trainer.set_epoch_lr(epoch)
    for loader in loaders:
        loader.set_epoch(epoch)
    gens = [epoch_generator(c.seed, epoch, device, "attack") for c in trainer.cfgs]
    warm = [c.lam_warmup_epochs > 0 and c.has_lambda for c in trainer.cfgs]
    bar = progress_bar(len(loaders[0]), f"epoch {epoch + 1}/{trainer.cfg.epochs} (x{k} fused)",
                       progress, position=position)
    # fp32 sums read back with float(), as train_epoch keeps its own, so the rows agree
    tot_loss = torch.zeros(k, device=device)
    tot_vcar = torch.zeros(k, device=device)
    errors: list[str | None] = [None] * k
    synchronize(device)   # CUDA queues work: the clock starts and stops with the device idle
    seen, steps, t0 = 0, 0, time.perf_counter()
    batches = None

    def check(means: list[float]) -> None:
        for i, v in enumerate(means):
            if errors[i] is None:
                try:
                    check_finite(v, epoch, steps)
                except NonFiniteLoss as e:
                    errors[i] = str(e)

    try:
        for batches in zip(*loaders):
            for i, c in enumerate(trainer.cfgs):
                if warm[i]:
                    trainer.states[i].lam = warmup_lam(c.lam, c.lam_warmup_epochs,
                                                 epoch * len(loaders[0]) + steps + 1, len(loaders[0]))
            x = trainer.model.stack([b[0] for b in batches])
            y = trainer.model.stack([b[1] for b in batches])
            out = trainer.train_step(x, y, gens)
            n = batches[0][1].numel()
            tot_loss += out.loss * n
            tot_vcar += out.vcar
            seen, steps = seen + n, steps + 1
            if bar is not None and (steps % 5 == 0 or steps == len(loaders[0])):
                means = [v / seen for v in tot_loss.tolist()]
                check(means)
                ok = [v for v, e in zip(means, errors) if e is None]
                bar.set_postfix(loss=f"{sum(ok) / max(len(ok), 1):.4f}", ok=f"{len(ok)}/{k}", lr=f"{lr:g}",
                                img_s=f"{k * seen / (time.perf_counter() - t0):.0f}")
                bar.update(steps - bar.n)
    finally:
        if bar is not None:
            bar.close()
    synchronize(device)
    secs = time.perf_counter() - t0
    losses = [v / max(seen, 1) for v in tot_loss.tolist()]
    vcars = [v / max(steps, 1) for v in tot_vcar.tolist()]
    check(losses)
    if batches is not None:   # the weights after the last update, as train_epoch checks them
        for i, model in enumerate(split_models(trainer.model)):
            if errors[i] is None:
                try:
                    check_model(model, *batches[i], epoch)
                except NonFiniteLoss as e:
                    errors[i] = str(e)
    rows = [{"epoch": epoch + 1, "lr": lr, "loss": losses[i], "vcar": vcars[i], "seconds": secs,
             "images_per_s": seen / secs if secs > 0 else 0.0} for i in range(k)]
    for i in range(k):
        if warm[i]:
            rows[i]["lam"] = trainer.states[i].lam
    return rows, errors
