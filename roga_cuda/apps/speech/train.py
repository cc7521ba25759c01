"""Training and evaluation of speech deepfake (spoofing) countermeasures: baseline vs DPDA.

* **baseline**: one path; each utterance is RawBoost-augmented (standard DA training; with
  ``train.baseline_augment_prob`` < 1 only that fraction of them) and the weighted
  cross-entropy is minimised with the base optimizer.
* **dpda** (dual-path data augmentation, arXiv 2509.20682): each utterance goes through a clean
  and a RawBoost path; the two losses' gradients are aligned by :class:`roga_cuda.optim.PCGrad`
  (method ``align``: pcgrad, gradvac, cagrad, mgda, or sum = no alignment) and summed.

Both log, per step, the cosine between the clean and augmented gradients and whether they
conflict (for the baseline only when ``train.probe_conflict_every`` > 0, at the cost of two extra
backward passes). After each epoch the dev set is scored; the best ``average_best`` epochs (by
dev EER, ties by dev loss) are averaged into the final model, which scores every test set.
"""
import contextlib
import json
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ... import ops
from ...optim import PCGrad, clip_grad_norm_
from ..common import (Amp, BatchStream, Checkpointer, MetricLogger, average_checkpoints, build_scheduler,
                      capture_state, derive_seed, eer, init_distributed, load_checkpoint, print0, progress, read_log,
                      restore_state, save_checkpoint, save_config, seed_everything, select_device)
from ..common.plots import plot_det, plot_roc, plot_training_curves
from ..common.runtime import all_gather_objects, is_main, world_size
from .data import build_data, iterate_batches
from .models import model_from_settings
from .plots import plot_conflicts
from .rawboost import ALGO_NAMES, RawBoost, RawBoostConfig
from .scoring import wave_set_metrics, write_set_scores

MODES = ("baseline", "dpda")
ALIGNS = ("pcgrad", "gradvac", "cagrad", "mgda", "sum")


# ------------------------------------------------------------------------------ builders

def model_from_config(cfg, device="cpu"):
    """The configured model on ``device``, lazy layers (the SSL projection) materialised."""
    model = _model_from_config(cfg).to(device)
    if any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in model.parameters()):
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, cfg.data.n_samples, device=device))
        model.train()
    return model


def _model_from_config(cfg):
    return model_from_settings(cfg.model, fs=cfg.data.fs)


def make_optimizer(cfg, params):
    o = cfg.optim
    if o.name == "adam":
        base, kw = torch.optim.Adam, {"lr": o.lr, "weight_decay": o.weight_decay, "betas": tuple(o.betas)}
    elif o.name == "adamw":
        base, kw = torch.optim.AdamW, {"lr": o.lr, "weight_decay": o.weight_decay, "betas": tuple(o.betas)}
    elif o.name == "sgd":
        base, kw = torch.optim.SGD, {"lr": o.lr, "weight_decay": o.weight_decay, "momentum": o.momentum}
    else:
        raise ValueError(f"unknown optim.name {o.name!r}; use adam, adamw or sgd")
    if cfg.mode == "baseline":
        return base(params, **kw)
    return PCGrad(params, base, method=cfg.align, reduction=o.reduction, backend=o.backend,
                  beta=o.gradvac_beta, c=o.cagrad_c, max_grad_norm=o.max_grad_norm or None,
                  seed=derive_seed(cfg.seed, "pcgrad"), **kw)


def validate(cfg):
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.align not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}, got {cfg.align!r}")
    if cfg.train.forward not in ("concat", "separate"):
        raise ValueError(f"train.forward must be concat or separate, got {cfg.train.forward!r}")
    if len(cfg.train.class_weights) != 2 or min(cfg.train.class_weights) < 0:
        raise ValueError(f"train.class_weights must be [spoof, bona fide] >= 0, got {cfg.train.class_weights}")
    if not 0 <= cfg.train.baseline_augment_prob <= 1:
        raise ValueError(f"train.baseline_augment_prob must be in [0, 1], got {cfg.train.baseline_augment_prob}")
    if cfg.train.epochs < 1:
        raise ValueError(f"train.epochs must be >= 1, got {cfg.train.epochs}")
    if cfg.augment.algo not in ALGO_NAMES:
        raise ValueError(f"augment.algo must be 0-8, got {cfg.augment.algo}")
    if cfg.mode == "dpda" and cfg.augment.algo == 0:
        raise ValueError("mode=dpda needs an augmentation (augment.algo 1-8): the two paths would be identical")


def run_label(cfg):
    return "baseline" if cfg.mode == "baseline" else f"dpda-{cfg.align}"


# ------------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, cfg, out_dir, data=None, log=print0):
        validate(cfg)
        self.cfg, self.out, self.log = cfg, out_dir, log
        rt = cfg.runtime
        if rt.threads:
            torch.set_num_threads(int(rt.threads))
        self.dist = init_distributed("cuda" if (rt.device != "cpu" and torch.cuda.is_available()) else "cpu")
        self.device = select_device(rt.device)
        seed_everything(cfg.seed, rt.deterministic)
        os.makedirs(out_dir, exist_ok=True)
        self.data = data if data is not None else build_data(cfg.data, log=log, progress=self._bar)
        self.model = model_from_config(cfg, self.device)
        if self.dist.enabled:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.ddp = None
        self.net = self.ddp or self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(cfg, self.params)
        self.amp = Amp(self.device, rt.amp, rt.amp_dtype)
        t = cfg.train
        self.batch = int(t.batch_size) if cfg.mode == "baseline" else int(t.dpda_batch_size or max(1, t.batch_size // 2))
        self.stream = BatchStream(len(self.data.train), self.batch, seed=cfg.seed, key="train",
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, int(t.max_steps))
        o = cfg.optim
        self.sched = build_scheduler(self.opt, o.schedule, self.total_steps, o.warmup_steps, o.min_lr_ratio)
        self.weights = torch.tensor(list(t.class_weights), dtype=torch.float32, device=self.device)
        rb_cfg = RawBoostConfig.from_dict({**cfg.augment.rawboost, "fs": cfg.data.fs})
        self.rawboost = RawBoost(cfg.augment.algo, rb_cfg, seed=cfg.seed)
        self.ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), every=t.ckpt_every_steps, keep=t.ckpt_keep)
        self.best_dir = os.path.join(out_dir, "best")
        # loop state (all of it goes into checkpoints)
        self.step = 0
        self.best = []            # [[dev_eer, dev_loss, epoch, path]] sorted best first
        self.history = []         # per-epoch dicts
        self.bad_epochs = 0
        self.probe = {"n": 0, "conflicts": 0}
        self.epoch_conf = {"n": 0, "conflicts": 0}
        self.pending = []         # per-step device tensors not yet written to steps.csv
        self.train_time = 0.0

    def _bar(self, it, desc=None, total=None):
        return progress(it, total=total, desc=desc, enabled=self.cfg.runtime.progress)

    # ---------------------------------------------------------------------------- steps
    def _loss(self, logits, y):
        return F.cross_entropy(logits.float(), y, weight=self.weights)

    def _augment(self, x, step):
        self.rawboost.reseed(derive_seed(self.cfg.seed, "rawboost", step, self.dist.rank))
        return self.rawboost(x)

    def _baseline_input(self, x, x_aug, step):
        """Each utterance augmented with probability ``train.baseline_augment_prob`` (1: all,
        the RawBoost recipes; the draw depends only on (seed, step, rank))."""
        p = float(self.cfg.train.baseline_augment_prob)
        if p >= 1 or x_aug is x:
            return x_aug
        if p <= 0:
            return x
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "augment-mask", step, self.dist.rank))
        pick = (torch.rand(len(x), generator=g) < p).to(x.device)
        return torch.where(pick[:, None], x_aug, x)

    def _train_step(self, x, y, step):
        cfg, t = self.cfg, self.cfg.train
        x_aug = self._augment(x, step) if cfg.augment.algo else x
        scaler = self.amp.active_scaler
        self.opt.zero_grad(set_to_none=True)
        rec = {"step": step}
        if cfg.mode == "baseline":
            if t.probe_conflict_every and step % t.probe_conflict_every == 0:
                rec.update(self._probe(x, x_aug, y))
            with self.amp.autocast():
                loss = self._loss(self.net(self._baseline_input(x, x_aug, step)), y)
            (scaler.scale(loss) if scaler else loss).backward()
            if cfg.optim.max_grad_norm:
                if scaler:
                    scaler.unscale_(self.opt)
                clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
            rec["loss"] = loss.detach()
        else:
            ctx = self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()
            with ctx:  # the forward too: DDP arms its gradient hooks at forward time
                with self.amp.autocast():
                    if t.forward == "concat":
                        logits = self.net(torch.cat([x, x_aug]))
                        l_c, l_a = self._loss(logits[:len(x)], y), self._loss(logits[len(x):], y)
                    else:
                        l_c, l_a = self._loss(self.net(x), y), self._loss(self.net(x_aug), y)
                self.opt.backward([l_c, l_a], scaler=scaler, model=self.ddp)
            st = self.opt.stats
            rec.update(loss=(l_c + l_a).detach(), loss_clean=l_c.detach(), loss_aug=l_a.detach(),
                       cos=st["cosine"][0, 1].detach(), conflict=st["any_conflict"].detach(),
                       conflict_rate=st["conflict_rate"].detach())
        if scaler:
            scaler.step(self.opt)
            scaler.update()
        else:
            self.opt.step()
        with warnings.catch_warnings():  # a GradScaler-skipped step makes LambdaLR warn; the schedule is per step anyway
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
            self.sched.step()
        rec["lr"] = self.opt.param_groups[0]["lr"]
        return rec

    def _probe(self, x, x_aug, y):
        """cos(g_clean, g_aug) at the current weights, without side effects on the model
        (BatchNorm statistics restored), in float32 on this process's batch."""
        model = self.model
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        grads = []
        for inp in (x, x_aug):
            loss = self._loss(model(inp), y)
            g = torch.autograd.grad(loss, self.params, allow_unused=True)
            grads.append([gi if gi is not None else torch.zeros_like(p) for gi, p in zip(g, self.params)])
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        G = ops.gram(grads, backend=self.cfg.optim.backend).double()
        cos = G[0, 1] / (G[0, 0].sqrt() * G[1, 1].sqrt()).clamp_min(1e-30)
        conflict = G[0, 1] < 0
        self.probe["n"] += 1
        self.probe["conflicts"] += int(conflict)
        return {"cos": cos, "conflict": conflict, "conflict_rate": self.probe["conflicts"] / self.probe["n"]}

    # ------------------------------------------------------------------------- logging
    def _flush(self, logger):
        for rec in self.pending:
            row = {}
            for k, v in rec.items():
                if k == "step":
                    continue
                if isinstance(v, torch.Tensor):
                    v = v.item()
                row[k] = int(v) if isinstance(v, bool) else v
                if k == "conflict":
                    self.epoch_conf["n"] += 1
                    self.epoch_conf["conflicts"] += int(v)
            logger.log(rec["step"], **row)
        self.pending = []

    # ----------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def score(self, ws, model=None):
        """(scores, mean weighted CE loss) of a WaveSet: score = bona fide logit - spoof logit."""
        model = model or self.model
        was = model.training
        model.eval()
        n = len(ws)
        idx = np.arange(n)[self.dist.rank::self.dist.world_size]
        bs = int(self.cfg.train.eval_batch_size)
        batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
        scores, losses = [], []
        for b, x in iterate_batches(ws, batches, self.cfg.data.workers):
            x = x.to(self.device, non_blocking=True)
            y = ws.labels[b].to(self.device)
            with self.amp.autocast():
                logits = model(x).float()
            scores.append((logits[:, 1] - logits[:, 0]).cpu())
            losses.append(F.cross_entropy(logits, y, weight=self.weights, reduction="none").cpu())  # w_y * CE
        model.train(was)
        s = torch.cat(scores).numpy() if scores else np.zeros(0)
        l_ = torch.cat(losses).numpy() if losses else np.zeros(0)
        if self.dist.world_size > 1:
            parts = all_gather_objects((idx, s, l_))
            s, l_ = np.zeros(n), np.zeros(n)
            for pi, ps, pl in parts:
                s[pi], l_[pi] = ps, pl
        # weighted CE as torch reduces it: sum(w_i l_i) / sum(w_i)
        wsum = float(self.weights.cpu()[ws.labels].sum())
        return s, float(l_.sum() / wsum) if wsum > 0 else math.nan

    # --------------------------------------------------------------------- checkpoints
    def _state(self):
        counters = {"step": self.step, "bad_epochs": self.bad_epochs, "probe_n": self.probe["n"],
                    "probe_conflicts": self.probe["conflicts"], "epoch_conf_n": self.epoch_conf["n"],
                    "epoch_conf_conflicts": self.epoch_conf["conflicts"], "train_time": self.train_time}
        extra = {"best": [list(b) for b in self.best], "history": json.dumps(self.history)}
        return capture_state(model=self.model, optimizer=self.opt, scheduler=self.sched, amp=self.amp,
                             counters=counters, config=self.cfg, extra=extra)

    def _restore(self, ckpt, path):
        c = restore_state(ckpt, model=self.model, optimizer=self.opt, scheduler=self.sched, amp=self.amp)
        self.step = int(c["step"])
        self.bad_epochs = int(c["bad_epochs"])
        self.probe = {"n": int(c["probe_n"]), "conflicts": int(c["probe_conflicts"])}
        self.epoch_conf = {"n": int(c["epoch_conf_n"]), "conflicts": int(c["epoch_conf_conflicts"])}
        self.train_time = float(c["train_time"])
        self.best = [list(b) for b in ckpt["extra"]["best"]]
        self.history = json.loads(ckpt["extra"]["history"])
        self.log(f"resumed from {path} at step {self.step} (epoch {self.step // self.steps_per_epoch + 1})")

    def _keep_best(self, epoch, dev_eer, dev_loss):
        """Keep the model of this epoch when it is among the best ``average_best``."""
        n = max(1, int(self.cfg.train.average_best))
        key = (dev_eer if not math.isnan(dev_eer) else math.inf, dev_loss)
        ranked = sorted(self.best + [[key[0], key[1], epoch, None]], key=lambda b: (b[0], b[1], b[2]))
        keep = ranked[:n]
        if any(b[2] == epoch for b in keep):
            path = os.path.join(self.best_dir, f"epoch_{epoch:04d}.pt")
            if is_main():
                save_checkpoint(path, {"model": self.model.state_dict(), "epoch": epoch, "dev_eer": dev_eer,
                                       "dev_loss": dev_loss})
            for b in keep:
                if b[2] == epoch:
                    b[3] = path
        for b in ranked[n:]:
            if b[3] and is_main() and os.path.isfile(b[3]):
                os.unlink(b[3])
        self.best = keep

    # -------------------------------------------------------------------------- fit
    def fit(self, resume=None):
        cfg, t = self.cfg, self.cfg.train
        ckpt, path = self.ckpt.load(resume) if resume else (None, None)
        if ckpt is not None:
            self._restore(ckpt, path)
        if is_main():
            save_config(cfg, os.path.join(self.out, "config.yaml"))
        resume_step = self.step if ckpt is not None else None
        steps_log = MetricLogger(self.out, "steps.csv", tensorboard=cfg.runtime.tensorboard, resume_step=resume_step)
        epoch_log = MetricLogger(self.out, "epochs.csv", tensorboard=False, resume_step=resume_step)
        self.log(f"[{run_label(cfg)}] {self.data.summary()}")
        self.log(f"[{run_label(cfg)}] model {cfg.model.name}: {sum(p.numel() for p in self.params):,} parameters; "
                 f"RawBoost {cfg.augment.algo} ({ALGO_NAMES[cfg.augment.algo]}); {self.batch} utterances/step, "
                 f"{self.steps_per_epoch} steps/epoch, {t.epochs} epochs; device {self.device}")
        self.model.train()
        bar = self._bar(None, desc=run_label(cfg), total=self.total_steps)
        self._active_bar = bar
        bar.update(self.step)
        t_start = time.time() - self.train_time
        stopped = False
        while self.step < self.total_steps and not stopped:
            idx = self.stream.indices(self.step)
            _, x = next(iterate_batches(self.data.train, [idx], 0))
            x = x.to(self.device, non_blocking=True)
            y = self.data.train.labels[idx].to(self.device)
            self.pending.append(self._train_step(x, y, self.step))
            self.step += 1
            bar.update(1)
            end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            if len(self.pending) >= max(1, t.log_every) or end_of_epoch:
                self._flush(steps_log)
                if cfg.mode == "dpda":
                    bar.set_postfix(conflict_rate=f"{self.opt.conflict_rate:.3f}")
            if end_of_epoch:
                stopped = self._end_epoch(epoch_log)
            self.train_time = time.time() - t_start
            if self.ckpt.due(self.step) or end_of_epoch:
                self._flush(steps_log)
                self.ckpt.save(self.step, self._state())
        bar.close()
        self._active_bar = None
        steps_log.close()
        epoch_log.close()
        return self.finish()

    def _end_epoch(self, epoch_log):
        cfg = self.cfg
        epoch = (self.step - 1) // self.steps_per_epoch + 1
        s, dev_loss = self.score(self.data.dev)
        dev_eer = eer(self.data.dev.labels.numpy(), s)[0]
        conf = self.epoch_conf["conflicts"] / self.epoch_conf["n"] if self.epoch_conf["n"] else math.nan
        self.epoch_conf = {"n": 0, "conflicts": 0}
        prev = min((b[0], b[1]) for b in self.best) if self.best else (math.inf, math.inf)
        improved = (dev_eer, dev_loss) < prev
        self._keep_best(epoch, dev_eer, dev_loss)
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        rec = {"epoch": epoch, "dev_eer": dev_eer, "dev_loss": dev_loss, "conflict_rate": conf,
               "lr": self.opt.param_groups[0]["lr"], "time_s": self.train_time}
        self.history.append(rec)
        epoch_log.log(self.step, **rec)
        mark = " *" if improved else ""
        say = getattr(getattr(self, "_active_bar", None), "write", None) if self.log is print0 else None
        (say or self.log)(f"[{run_label(cfg)}] epoch {epoch:3d}  dev EER {100 * dev_eer:6.2f}%  dev loss {dev_loss:.4f}  "
                 f"conflict rate {conf if not math.isnan(conf) else float('nan'):.3f}  ({self.train_time:.0f}s){mark}")
        return bool(cfg.train.patience and self.bad_epochs >= cfg.train.patience)

    # ---------------------------------------------------------------------- finish
    def finish(self):
        """Average the best epochs, score every test set, write metrics, scores and plots."""
        cfg = self.cfg
        paths = [b[3] for b in self.best if b[3]]
        if not paths:
            raise RuntimeError("no epoch finished: nothing to evaluate (raise train.max_steps or train.epochs)")
        if world_size() > 1:
            torch.distributed.barrier()
        avg = average_checkpoints(paths)
        final = model_from_config(cfg, self.device)
        final.load_state_dict(avg)
        avg_path = os.path.join(self.out, "model_avg.pt")
        if is_main():
            save_checkpoint(avg_path, {"model": avg, "config": cfg.to_dict(), "averaged": paths})
        best = self.best[0]
        result = {
            "run": run_label(cfg), "mode": cfg.mode, "align": cfg.align if cfg.mode == "dpda" else None,
            "model": cfg.model.name, "rawboost_algo": cfg.augment.algo,
            "epochs_run": len(self.history), "steps": self.step, "steps_per_epoch": self.steps_per_epoch,
            "epochs_to_best": int(best[2]), "best_dev_eer": best[0], "best_dev_loss": best[1],
            "averaged_epochs": [int(b[2]) for b in self.best if b[3]],
            "train_time_s": self.train_time,
        }
        if cfg.mode == "dpda":
            result["conflict_rate"] = self.opt.conflict_rate
            result["conflict_rate_source"] = "every step (PCGrad statistics)"
        elif self.probe["n"]:
            result["conflict_rate"] = self.probe["conflicts"] / self.probe["n"]
            result["conflict_rate_source"] = f"probe every {cfg.train.probe_conflict_every} steps ({self.probe['n']} probes)"
        else:
            result["conflict_rate"] = None
            result["conflict_rate_source"] = "not measured (train.probe_conflict_every=0)"
        result["conflict_rate_by_epoch"] = [h["conflict_rate"] for h in self.history]
        result["sets"] = evaluate_sets(self, final, self.out)
        main = main_set(self.data)
        result["main_set"] = main
        result["eer"] = result["sets"][main]["eer"]
        result["per_attack_eer"] = result["sets"][main]["per_attack_eer"]
        if "min_tdcf" in result["sets"][main]:
            result["min_tdcf"] = result["sets"][main]["min_tdcf"]
        if is_main():
            write_json(os.path.join(self.out, "metrics.json"), result)
            self._plots()
        return result

    def _plots(self):
        steps = read_log(os.path.join(self.out, "steps.csv"))
        if "cos" in steps:
            epochs = [(h["epoch"], h["conflict_rate"]) for h in self.history if not math.isnan(h["conflict_rate"])]
            plot_conflicts(steps["step"], steps["cos"], steps.get("conflict", []), steps.get("conflict_rate", []),
                           epochs, os.path.join(self.out, "conflict_rate.png"), title=run_label(self.cfg))
        ep = read_log(os.path.join(self.out, "epochs.csv"))
        keys = [k for k in ("dev_eer", "dev_loss", "conflict_rate", "lr") if k in ep]
        plot_training_curves(ep, os.path.join(self.out, "training_curves.png"), keys=keys, x="epoch",
                             title=run_label(self.cfg))


def main_set(data):
    return "eval" if "eval" in data.tests else next(iter(data.tests))


def evaluate_sets(trainer, model, out_dir):
    """Score every test set with ``model``; write score files and DET/ROC plots."""
    data, res, curves = trainer.data, {}, {}
    for name, ws in data.tests.items():
        s, loss = trainer.score(ws, model)
        labels = ws.labels.numpy()
        if is_main():
            write_set_scores(out_dir, name, ws, s)
        res[name] = wave_set_metrics(ws, s, data.asv_scores.get(name))
        res[name]["loss"] = loss
        curves[name] = (labels, s)
    if is_main() and curves:
        plot_det(curves, os.path.join(out_dir, "det.png"), title="DET (bona fide = positive)")
        plot_roc(curves, os.path.join(out_dir, "roc.png"), title="ROC (bona fide = positive)")
        main = main_set(data)
        ws = data.tests[main]
        labels, s = curves[main]
        att = np.asarray(ws.attacks)
        per = {a: (np.r_[labels[labels == 1], labels[att == a]], np.r_[s[labels == 1], s[att == a]])
               for a in sorted(set(att[labels == 0].tolist()))}
        if per:
            plot_det(per, os.path.join(out_dir, f"det_{main}_per_attack.png"), title=f"DET per attack ({main})")
    return res


def write_json(path, obj):
    def clean(v):
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.floating, np.integer)):
            return clean(v.item())
        return v
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(clean(obj), f, indent=2)
    os.replace(tmp, path)
    return path


def train(cfg, out_dir, data=None, resume=None, log=print0):
    """Train one configuration into ``out_dir``; returns the metrics dict."""
    trainer = Trainer(cfg, out_dir, data=data, log=log)
    return trainer.fit(resume=resume)


def evaluate_checkpoint(cfg, checkpoint, out_dir, data=None, log=print0):
    """Score a saved model (model_avg.pt, best/epoch_*.pt or a step checkpoint) on the test sets."""
    ck = load_checkpoint(checkpoint)
    state = ck["model"] if isinstance(ck, dict) and "model" in ck else ck
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.out, tr.log = cfg, out_dir, log
    if cfg.runtime.threads:
        torch.set_num_threads(int(cfg.runtime.threads))
    tr.dist = init_distributed("cuda" if (cfg.runtime.device != "cpu" and torch.cuda.is_available()) else "cpu")
    tr.device = select_device(cfg.runtime.device)
    tr.data = data if data is not None else build_data(cfg.data, log=log)
    tr.model = model_from_config(cfg, tr.device)
    tr.model.load_state_dict(state)
    tr.amp = Amp(tr.device, cfg.runtime.amp, cfg.runtime.amp_dtype)
    tr.weights = torch.tensor(list(cfg.train.class_weights), dtype=torch.float32, device=tr.device)
    os.makedirs(out_dir, exist_ok=True)
    sets = evaluate_sets(tr, tr.model, out_dir)
    main = main_set(tr.data)
    result = {"checkpoint": os.path.abspath(checkpoint), "main_set": main, "eer": sets[main]["eer"],
              "per_attack_eer": sets[main]["per_attack_eer"], "sets": sets}
    if "min_tdcf" in sets[main]:
        result["min_tdcf"] = sets[main]["min_tdcf"]
    if is_main():
        write_json(os.path.join(out_dir, "metrics.json"), result)
    return result
