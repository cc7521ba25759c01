"""Training and evaluation of speech deepfake (spoofing) countermeasures: baseline vs DPDA.

* **baseline**: one path; each utterance is RawBoost-augmented (standard DA training; with
  ``train.baseline_augment_prob`` < 1 only that fraction of them) and the weighted
  cross-entropy is minimised with the base optimizer.
* **dpda** (dual-path data augmentation, arXiv 2509.20682): each utterance goes through a clean
  and a RawBoost path; the two losses' gradients are aligned by :class:`roga_cuda.optim.PCGrad`
  (``optim.align``: pcgrad, gradvac, cagrad, mgda, or sum = no alignment) and summed.

Both log, per step, the cosine between the clean and augmented gradients and whether they
conflict (for the baseline only when ``train.probe_conflict_every`` > 0, at the cost of two extra
backward passes). After each epoch the dev set is scored; the best ``average_best`` epochs (by
dev EER, ties by dev loss) are averaged into the final model, which scores every test set.

:class:`SpeechTrainer` fills in the shared loop of :class:`roga_cuda.apps.common.trainer.Trainer`
(checkpoints, resume, logging, early stopping, progress) with this app's data, model, step
and metrics.
"""
import contextlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ... import ops
from ...optim import PCGrad, clip_grad_norm_
from ..common import average_checkpoints, derive_seed, eer, load_checkpoint, print0, read_log, roc_auc, save_checkpoint
from ..common.plots import plot_det, plot_roc, plot_training_curves
from ..common.runtime import (Amp, all_gather_objects, barrier, in_weight_layout, init_distributed, is_main, progress,
                              select_device, set_num_threads)
from ..common.sharding import forward_count, full_state_dict, is_sharded, load_full_state_dict
from ..common.trainer import Trainer, make_optimizer
from ..common.training import BatchStream
from .data import build_data, iterate_batches
from .models import model_from_settings
from .plots import plot_conflicts
from .rawboost import ALGO_NAMES, RawBoost, RawBoostConfig
from .scoring import wave_set_metrics, write_set_scores

METHODS = ("baseline", "dpda")
ALIGNS = ("pcgrad", "gradvac", "cagrad", "mgda", "sum")
MONITORS = {"eer": "min", "auc": "max", "loss": "min"}


# ------------------------------------------------------------------------------ builders

def model_from_config(cfg, device="cpu"):
    """The configured model on ``device`` in the configured weight layout, lazy layers (the SSL
    projection) materialised."""
    model = in_weight_layout(_model_from_config(cfg).to(device), cfg)
    if any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in model.parameters()):
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, cfg.data.n_samples, device=device))
        model.train()
    return model


def _model_from_config(cfg):
    return model_from_settings(cfg.model, fs=cfg.data.fs)


def build_optimizer(cfg, params):
    """The base optimizer (``optim.name``); DPDA wraps it in PCGrad with ``optim.align``."""
    o = cfg.optim
    if cfg.method == "baseline":
        return make_optimizer(o, params)
    return make_optimizer(o, params, PCGrad, method=o.align, reduction=o.reduction, backend=o.backend,
                          beta=o.gradvac_beta, c=o.cagrad_c, max_grad_norm=o.max_grad_norm or None,
                          seed=derive_seed(cfg.seed, "pcgrad"))


def validate(cfg):
    """Reject bad settings with a ValueError naming the key."""
    t = cfg.train
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.optim.align not in ALIGNS:
        raise ValueError(f"optim.align must be one of {ALIGNS}, got {cfg.optim.align!r}")
    if t.forward not in ("concat", "separate"):
        raise ValueError(f"train.forward must be concat or separate, got {t.forward!r}")
    if len(t.class_weights) != 2 or min(t.class_weights) < 0:
        raise ValueError(f"train.class_weights must be [spoof, bona fide] >= 0, got {t.class_weights}")
    if not 0 <= t.baseline_augment_prob <= 1:
        raise ValueError(f"train.baseline_augment_prob must be in [0, 1], got {t.baseline_augment_prob}")
    if t.epochs < 1:
        raise ValueError(f"train.epochs must be >= 1, got {t.epochs}")
    if t.steps < 0:
        raise ValueError(f"train.steps must be >= 0 (0: run all epochs), got {t.steps}")
    if t.monitor not in MONITORS:
        raise ValueError(f"train.monitor must be one of {', '.join(MONITORS)}, got {t.monitor!r}")
    if int(t.log_every) < 1 or int(t.checkpoint_every) < 0 or int(t.average_best) < 1:
        raise ValueError("train.log_every and train.average_best must be >= 1, train.checkpoint_every >= 0")
    if cfg.augment.algo not in ALGO_NAMES:
        raise ValueError(f"augment.algo must be 0-8, got {cfg.augment.algo}")
    if cfg.method == "dpda" and cfg.augment.algo == 0:
        raise ValueError("method=dpda needs an augmentation (augment.algo 1-8): the two paths would be identical")
    if t.fsdp and cfg.method == "baseline" and t.probe_conflict_every:
        raise ValueError("train.probe_conflict_every is not supported with train.fsdp=true (its probe takes "
                         "per-process gradients outside FSDP's backward); set it to 0")


def run_label(cfg):
    return "baseline" if cfg.method == "baseline" else f"dpda-{cfg.optim.align}"


# ------------------------------------------------------------------------------- trainer

class SpeechTrainer(Trainer):
    """Baseline or DPDA on the shared loop: one row per step in steps.csv, validation on the
    dev set at every epoch end (epochs.csv), a checkpoint there too, the best
    ``train.average_best`` epochs kept and averaged at the end."""

    app = "speech"
    log_name, eval_log_name = "steps.csv", "epochs.csv"
    log_windows = False
    checkpoint_on_eval = True
    monitor_key, tiebreak_key = "dev_eer", "dev_loss"

    label = property(lambda self: run_label(self.cfg))

    def check_config(self, cfg):
        validate(cfg)
        self.monitor_key = f"dev_{cfg.train.monitor}"
        self.monitor_mode = MONITORS[cfg.train.monitor]
        self.tiebreak_key = "dev_loss" if cfg.train.monitor != "loss" else "dev_eer"

    def build_data(self):
        return build_data(self.cfg.data, log=self.log, progress=self._bar)

    def build_model(self):
        return model_from_config(self.cfg, self.device)

    def build_optimizer(self):
        return build_optimizer(self.cfg, self.params)

    def plan_steps(self):
        cfg, t = self.cfg, self.cfg.train
        self.batch = int(t.batch_size) if cfg.method == "baseline" else int(t.dpda_batch_size or max(1, t.batch_size // 2))
        self.stream = BatchStream(len(self.data.train), self.batch, seed=cfg.seed, key="train",
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        self.steps_per_epoch = self.stream.steps_per_epoch
        total = t.epochs * self.steps_per_epoch
        return min(total, int(t.steps)) if t.steps else total

    def prepare(self):
        cfg, t = self.cfg, self.cfg.train
        self.weights = torch.tensor(list(t.class_weights), dtype=torch.float32, device=self.device)
        rb_cfg = RawBoostConfig.from_dict({**cfg.augment.rawboost, "fs": cfg.data.fs})
        self.rawboost = RawBoost(cfg.augment.algo, rb_cfg, seed=cfg.seed)
        self.best_dir = os.path.join(self.out, "best")
        self.best = []            # [[monitored, tiebreak, epoch, kept]] best first; files best/epoch_<N>.pt
        self.history = []         # per-epoch dicts
        self.probe = {"n": 0, "conflicts": 0}
        self.epoch_conf = {"n": 0, "conflicts": 0}

    def _bar(self, it, desc=None, total=None):
        return progress(it, total=total, desc=desc, enabled=self.cfg.runtime.progress)

    def stale_outputs(self):
        return [self.best_dir, os.path.join(self.out, "model_avg.pt"), os.path.join(self.out, "metrics.json")]

    def start(self):
        cfg, t = self.cfg, self.cfg.train
        self.model.train()
        self.log(f"[{self.label}] {self.data.summary()}")
        self.log(f"[{self.label}] model {cfg.model.name}: {sum(p.numel() for p in self.params):,} parameters; "
                 f"RawBoost {cfg.augment.algo} ({ALGO_NAMES[cfg.augment.algo]}); {self.batch} utterances/step, "
                 f"{self.steps_per_epoch} steps/epoch, {t.epochs} epochs; device {self.device}")

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

    def train_step(self, step):
        idx = self.stream.indices(step)
        _, x = next(iterate_batches(self.data.train, [idx], 0))
        x = x.to(self.device, non_blocking=True)
        y = self.data.train.labels[idx].to(self.device)
        cfg, t = self.cfg, self.cfg.train
        x_aug = self._augment(x, step) if cfg.augment.algo else x
        scaler = self.amp.active_scaler
        self.opt.zero_grad(set_to_none=True)
        rec = {}
        if cfg.method == "baseline":
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
            # DDP: PCGrad all-reduces each path's gradient itself; FSDP: the two passes reduce-scatter,
            # with the parameters kept gathered between them (model=)
            wrapped = self.ddp if self.ddp is not None else (self.model if self.fsdp else None)
            with ctx:  # the forward too: DDP arms its gradient hooks at forward time
                with self.amp.autocast():
                    if t.forward == "concat":
                        logits = self.net(torch.cat([x, x_aug]))
                        l_c, l_a = self._loss(logits[:len(x)], y), self._loss(logits[len(x):], y)
                    else:
                        l_c, l_a = self._loss(self.net(x), y), self._loss(self.net(x_aug), y)
                self.opt.backward([l_c, l_a], scaler=scaler, model=wrapped)
            st = self.opt.stats
            rec.update(loss=(l_c + l_a).detach(), loss_clean=l_c.detach(), loss_aug=l_a.detach(),
                       cos=st["cosine"][0, 1].detach(), conflict=st["any_conflict"].detach(),
                       conflict_rate=st["conflict_rate"].detach())
        if scaler:
            scaler.step(self.opt)
            scaler.update()
        else:
            self.opt.step()
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

    def log_rows(self, rows):
        for row in rows:  # the conflict rate of the epoch, from the per-step flags
            if "conflict" in row:
                self.epoch_conf["n"] += 1
                self.epoch_conf["conflicts"] += int(row["conflict"])

    # ----------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def score(self, ws, model=None):
        """(scores, mean weighted CE loss) of a WaveSet: score = bona fide logit - spoof logit.
        Each rank scores a slice; on a sharded model (FSDP) every rank runs as many forward
        passes as rank 0, the extra ones on a throw-away batch."""
        model = model or self.model
        was = model.training
        model.eval()
        n = len(ws)
        idx = np.arange(n)[self.dist.rank::self.dist.world_size]
        bs = int(self.cfg.eval.batch_size)
        batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
        scores, losses = [], []
        for b, x in iterate_batches(ws, batches, self.cfg.data.workers):
            x = x.to(self.device, non_blocking=True)
            y = ws.labels[b].to(self.device)
            with self.amp.autocast():
                logits = model(x).float()
            scores.append((logits[:, 1] - logits[:, 0]).cpu())
            losses.append(F.cross_entropy(logits, y, weight=self.weights, reduction="none").cpu())  # w_y * CE
        extra = forward_count(n, bs, is_sharded(model)) - len(batches)
        for _, x in (iterate_batches(ws, [np.arange(1)] * extra, 0) if extra > 0 else ()):
            with self.amp.autocast():
                model(x.to(self.device))
        model.train(was)
        s = torch.cat(scores).numpy() if scores else np.zeros(0)
        l_ = torch.cat(losses).numpy() if losses else np.zeros(0)
        if self.dist.world_size > 1:
            parts = all_gather_objects((idx, s, l_))
            s, l_ = np.zeros(n), np.zeros(n)
            for pi, ps, pl in parts:
                s[pi], l_[pi] = ps, pl
        if not np.isfinite(s).all():
            bad = [ws.utt_ids[i] for i in np.flatnonzero(~np.isfinite(s))[:3]]
            raise ValueError(f"the model gave non-finite scores on set {ws.name!r} (e.g. {', '.join(bad)}): training "
                             "diverged (lower optim.lr or set optim.max_grad_norm) or the audio holds NaN/inf")
        # weighted CE as torch reduces it: sum(w_i l_i) / sum(w_i)
        wsum = float(self.weights.cpu()[ws.labels].sum())
        return s, float(l_.sum() / wsum) if wsum > 0 else math.nan

    def eval_due(self, step):
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def validate(self, step):
        epoch = (step - 1) // self.steps_per_epoch + 1
        s, dev_loss = self.score(self.data.dev)
        labels = self.data.dev.labels.numpy()
        conf = self.epoch_conf["conflicts"] / self.epoch_conf["n"] if self.epoch_conf["n"] else math.nan
        self.epoch_conf = {"n": 0, "conflicts": 0}
        return {"epoch": epoch, "dev_eer": eer(labels, s)[0], "dev_auc": roc_auc(labels, s), "dev_loss": dev_loss,
                "conflict_rate": conf, "lr": self.opt.param_groups[0]["lr"], "time_s": self.train_time}

    def _best_path(self, epoch):
        return os.path.join(self.best_dir, f"epoch_{int(epoch):04d}.pt")

    def after_validation(self, metrics, improved):
        """Keep this epoch's model when it is among the best ``average_best``."""
        epoch, n = metrics["epoch"], max(1, int(self.cfg.train.average_best))
        key = metrics[self.monitor_key]
        key = -key if self.monitor_mode == "max" else key  # rank ascending
        key = math.inf if math.isnan(key) else key
        tie = metrics[self.tiebreak_key]
        ranked = sorted(self.best + [[key, tie, epoch, False]], key=lambda b: (b[0], b[1], b[2]))
        keep = ranked[:n]
        for b in keep:
            if b[2] == epoch:
                state = full_state_dict(self.model)  # FSDP: gathered on rank 0, every rank taking part
                if is_main():
                    save_checkpoint(self._best_path(epoch), {"model": state, "epoch": epoch,
                                                             "dev_eer": metrics["dev_eer"],
                                                             "dev_loss": metrics["dev_loss"]})
                b[3] = True
        for b in ranked[n:]:
            if b[3] and is_main() and os.path.isfile(self._best_path(b[2])):
                os.unlink(self._best_path(b[2]))
        self.best = keep
        self.history.append(metrics)
        conf = metrics["conflict_rate"]
        self.say(f"[{self.label}] epoch {epoch:3d}  dev EER {100 * metrics['dev_eer']:6.2f}%  dev loss "
                 f"{metrics['dev_loss']:.4f}  conflict rate {conf:.3f}  ({self.train_time:.0f}s)" +
                 (" *" if improved else ""))

    def app_state(self):
        return {"best": [list(b) for b in self.best], "history": json.dumps(self.history),
                "probe": dict(self.probe), "epoch_conf": dict(self.epoch_conf)}

    def load_app_state(self, st):
        self.best = [list(b) for b in st["best"]]
        self.history = json.loads(st["history"])
        self.probe, self.epoch_conf = dict(st["probe"]), dict(st["epoch_conf"])

    # ---------------------------------------------------------------------- finish
    def finish(self):
        """Average the best epochs, score every test set, write metrics, scores and plots."""
        cfg = self.cfg
        kept = [b for b in self.best if b[3]]
        if not kept:
            raise RuntimeError("no epoch finished: nothing to evaluate (raise train.steps or train.epochs)")
        barrier()
        paths = [self._best_path(b[2]) for b in kept]  # under this run folder, wherever it has moved since
        avg = average_checkpoints(paths)
        if self.fsdp:  # score with the sharded model: no rank holds a whole copy
            load_full_state_dict(self.model, avg)
            final = self.model
        else:
            final = model_from_config(cfg, self.device)
            final.load_state_dict(avg)
        if is_main():
            save_checkpoint(os.path.join(self.out, "model_avg.pt"),
                            {"model": avg, "config": cfg.to_dict(), "app": self.app,
                             "averaged": [os.path.relpath(p, self.out) for p in paths]})
        best = self.best[0]
        best_h = next(h for h in self.history if h["epoch"] == best[2])
        result = {
            "run": self.label, "method": cfg.method, "align": cfg.optim.align if cfg.method == "dpda" else None,
            "seed": int(cfg.seed), "model": cfg.model.name, "rawboost_algo": cfg.augment.algo,
            "epochs_run": len(self.history), "steps": self.step, "steps_per_epoch": self.steps_per_epoch,
            "epochs_to_best": int(best[2]), "best_dev_eer": best_h["dev_eer"], "best_dev_loss": best_h["dev_loss"],
            "averaged_epochs": [int(b[2]) for b in kept], "stopped_early": self.stopped_early,
            "train_time_s": self.train_time, "data_time_s": self.data_time,
        }
        if cfg.method == "dpda":
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
        result["wall_time_s"] = time.time() - self.t_created
        if is_main():
            write_json(os.path.join(self.out, "metrics.json"), result)
            self._plots()
        return result

    def _plots(self):
        steps = read_log(os.path.join(self.out, "steps.csv"))
        if "cos" in steps:
            epochs = [(h["epoch"], h["conflict_rate"]) for h in self.history if not math.isnan(h["conflict_rate"])]
            plot_conflicts(steps["step"], steps["cos"], steps.get("conflict", []), steps.get("conflict_rate", []),
                           epochs, os.path.join(self.out, "conflict_rate.png"), title=self.label)
        ep = read_log(os.path.join(self.out, "epochs.csv"))
        keys = [k for k in ("dev_eer", "dev_loss", "conflict_rate", "lr") if k in ep]
        plot_training_curves(ep, os.path.join(self.out, "training_curves.png"), keys=keys, x="epoch",
                             title=self.label)


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
    return SpeechTrainer(cfg, out_dir, data=data, log=log).fit(resume=resume)


class _Scorer:
    """What :func:`evaluate_sets` needs of a trainer, for scoring a saved model."""
    score = SpeechTrainer.score

    def __init__(self, cfg, data, device, amp, dist):
        self.cfg, self.data, self.device, self.amp, self.dist = cfg, data, device, amp, dist
        self.weights = torch.tensor(list(cfg.train.class_weights), dtype=torch.float32, device=device)


def evaluate_checkpoint(cfg, checkpoint, out_dir, data=None, log=print0):
    """Score a saved model (model_avg.pt, best/epoch_*.pt or a step checkpoint) on the test sets."""
    from ..common.trainer import check_app
    ck = load_checkpoint(checkpoint)
    check_app(ck, "speech", checkpoint)
    state = ck["model"] if isinstance(ck, dict) and "model" in ck else ck
    set_num_threads(cfg.runtime.threads)
    dist = init_distributed("cuda" if (cfg.runtime.device != "cpu" and torch.cuda.is_available()) else "cpu")
    device = select_device(cfg.runtime.device)
    data = data if data is not None else build_data(cfg.data, log=log)
    model = model_from_config(cfg, device)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{checkpoint}: the weights do not fit the model its config describes "
                         f"({str(e).splitlines()[0]})") from e
    scorer = _Scorer(cfg, data, device, Amp(device, cfg.runtime.amp, cfg.runtime.amp_dtype), dist)
    os.makedirs(out_dir, exist_ok=True)
    sets = evaluate_sets(scorer, model, out_dir)
    main = main_set(data)
    result = {"checkpoint": os.path.abspath(checkpoint), "main_set": main, "eer": sets[main]["eer"],
              "per_attack_eer": sets[main]["per_attack_eer"], "sets": sets}
    if "min_tdcf" in sets[main]:
        result["min_tdcf"] = sets[main]["min_tdcf"]
    if is_main():
        write_json(os.path.join(out_dir, "metrics.json"), result)
    return result
