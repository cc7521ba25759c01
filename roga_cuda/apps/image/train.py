"""The image detector's training: ERM, SAM (or GSAM, WSAM, Friendly-SAM, LookSAM) or RoGA
over K training domains.

Every step draws one batch per training domain (half real, half fake; the batches are a
pure function of the step, see ``common.training.BatchStream``). ERM and SAM train on the
K batches concatenated; RoGA runs its per-domain cycle (backward, perturb, backward at
the perturbed point with BatchNorm statistics frozen, accumulate) and steps once.

:class:`ImageTrainer` fills in the shared loop of :class:`roga_cuda.apps.common.trainer.Trainer`
(checkpoints, resume, logging, early stopping, progress) with this app's data, model,
step and metrics.
"""
import contextlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ...optim import GSAM, SAM, WSAM, FriendlySAM, LookSAM, RoGA, clip_grad_norm_, freeze_bn_stats
from ..common import metrics as M
from ..common.checkpoint import load_checkpoint, save_checkpoint
from ..common.plots import plot_det, plot_roc, plot_training_curves
from ..common.runtime import all_gather_objects, barrier, in_weight_layout, is_main, make_generator, print0
from ..common.sharding import forward_count, full_state_dict, is_sharded, load_full_state_dict
from ..common.trainer import Trainer, make_optimizer
from ..common.training import BatchStream, read_log, unwrap_model
from .data import build_image_data, to_input
from .models import build_model

__all__ = ["train", "ImageTrainer", "build_optimizer", "evaluate_domains", "predict", "summarize", "METHODS"]

METHODS = ("erm", "sam", "gsam", "wsam", "fsam", "looksam", "roga")
SAM_FAMILY = ("sam", "gsam", "wsam", "fsam", "looksam")  # first_step / second backward / second_step
MONITORS = ("auc", "eer", "video_auc", "ap")
OPTIMIZERS = METHODS  # the name main's SAM-family merge used


def build_optimizer(cfg, params, num_domains):
    """The base optimizer (``optim.name``), wrapped in SAM or RoGA for those methods."""
    o, name = cfg.optim, cfg.method
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    if name == "erm":
        return make_optimizer(o, params)
    common = dict(backend=o.backend, strategy=o.strategy, max_grad_norm=o.max_grad_norm or None)
    if name == "looksam":  # its k is its interval
        if o.interval != 1:
            raise ValueError("method=looksam: set its SAM-step period with optim.looksam_k, not optim.interval")
        return make_optimizer(o, params, LookSAM, rho=o.rho, k=o.looksam_k, alpha=o.looksam_alpha,
                              adaptive=o.adaptive, **common)
    common["interval"] = o.interval
    if name == "roga":
        return make_optimizer(o, params, RoGA, rho=o.rho, alpha=o.alpha, alignment=o.alignment,
                              num_domains=num_domains, **common)
    variant = {"sam": (SAM, {}), "gsam": (GSAM, dict(alpha=o.gsam_alpha)), "wsam": (WSAM, dict(gamma=o.wsam_gamma)),
               "fsam": (FriendlySAM, dict(sigma=o.fsam_sigma, lmbda=o.fsam_lmbda))}
    cls, extra = variant[name]
    return make_optimizer(o, params, cls, rho=o.rho, adaptive=o.adaptive, **extra, **common)


def _bce(logits, y):
    return F.binary_cross_entropy_with_logits(logits.float().squeeze(1), y.float())


def model_from_config(cfg, device="cpu", pretrained=True):
    """The configured model on ``device`` in the configured weight layout (``pretrained``:
    load model.pretrained's weights; roga-eval loads a checkpoint's instead)."""
    m = cfg.model
    model = build_model(m.arch, int(cfg.data.image_size), m.width, m.pretrained if pretrained else None,
                        float(m.dropout), int(m.xception_middle_blocks)).to(device)
    return in_weight_layout(model, cfg)


class _Stepper:
    """One optimisation step of ERM / SAM / RoGA, with AMP, clipping and DDP handled."""

    def __init__(self, cfg, model, opt, amp, ddp):
        self.cfg, self.model, self.opt, self.amp, self.ddp = cfg, model, opt, amp, ddp
        self.kind = cfg.method
        self.hvp = cfg.method == "roga" and cfg.optim.alignment == "hvp"

    def _loss(self, x, y):
        with self.amp.autocast():
            return _bce(self.model(x), y)

    def __call__(self, batches):
        scaler = self.amp.active_scaler
        self.opt.zero_grad(set_to_none=True)
        if self.kind == "roga":
            losses = []
            with RoGA.no_sync(self.model):  # RoGA all-reduces the accumulated gradient once, in step()
                for x, y in batches:
                    loss = self._loss(x, y)
                    self.amp.scale(loss).backward()
                    if self.opt.perturb(scaler=scaler):  # False: a plain step of optim.interval
                        with freeze_bn_stats(self.model):
                            self.amp.scale(self._loss(x, y)).backward(create_graph=self.hvp)
                    self.opt.accumulate()
                    losses.append(loss.detach())
            self.opt.step(scaler=scaler)
            if scaler is not None:
                scaler.update()
            return torch.stack(losses).mean()
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        if self.kind in SAM_FAMILY:
            # A local (unsynchronised) first pass only feeds the ascent: not for the variants
            # whose update reads it (GSAM, WSAM, LookSAM) nor for interval's plain steps.
            local = (self.ddp and not self.cfg.optim.sam_sync_first_pass and self.kind in ("sam", "fsam")
                     and self.cfg.optim.interval == 1)
            with (self.model.no_sync() if local else contextlib.nullcontext()):
                loss = self._loss(x, y)
                self.amp.scale(loss).backward()
            kw = {"scaler": scaler} if self.kind == "fsam" else {}  # F-SAM averages unscaled gradients
            if self.opt.first_step(zero_grad=True, **kw):  # False: a plain (reuse) step, one backward
                with freeze_bn_stats(self.model):
                    self.amp.scale(self._loss(x, y)).backward()
            if scaler is not None:
                scaler.step(self.opt)  # reaches SAM.step(): restore, unscale, skip on inf/nan
                scaler.update()
            else:
                self.opt.second_step(zero_grad=True)
            return loss.detach()
        loss = self._loss(x, y)
        self.amp.scale(loss).backward()
        if scaler is not None:
            scaler.unscale_(self.opt)
        if self.cfg.optim.max_grad_norm:
            clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.cfg.optim.max_grad_norm,
                            backend=self.cfg.optim.backend)
        if scaler is not None:
            scaler.step(self.opt)
            scaler.update()
        else:
            self.opt.step()
        return loss.detach()


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, frames, cfg, device, amp=None):
    """Scores (sigmoid of the logit, 1 = fake) for every frame of ``frames``; under DDP
    and FSDP each rank scores a shard and every rank gets all scores (FSDP: every rank runs
    as many forward passes as rank 0, the extra ones on a throw-away batch)."""
    from ..common.runtime import rank, world_size
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    r, w = rank(), world_size()
    idx = np.arange(len(frames))[r::w]
    bs = int(cfg.eval.batch_size)
    out = []
    mean, std = cfg.data.mean, cfg.data.std
    if frames.in_memory or cfg.data.workers == 0:
        chunks = (frames.batch(idx[i:i + bs])[0] for i in range(0, len(idx), bs))
    else:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(frames, idx.tolist()), batch_size=bs,
                                             num_workers=int(cfg.data.workers))
        chunks = (x for x, _ in loader)
    ctx = amp.autocast() if amp is not None else contextlib.nullcontext()
    for x in chunks:
        with ctx:
            logits = net(to_input(x, device, mean, std))
        out.append(torch.sigmoid(logits.float().squeeze(1)).cpu())
    for _ in range(forward_count(len(frames), bs, is_sharded(net)) - len(out)):  # join rank 0's all-gathers
        with ctx:
            net(to_input(frames.batch(np.arange(1))[0], device, mean, std))
    net.train(was_training)
    scores = torch.cat(out).numpy() if out else np.zeros(0, np.float32)
    if w > 1:
        parts = all_gather_objects((idx, scores))
        full = np.zeros(len(frames), np.float32)
        for i, s in parts:
            full[i] = s
        scores = full
    return scores.astype(np.float64)


def evaluate_domains(model, domains, split, cfg, device, amp=None):
    """{domain: metrics} and {domain: (labels, scores, videos)} on ``split`` of each domain."""
    res, raw = {}, {}
    for dom in domains:
        fs = dom.splits.get(split)
        if fs is None:
            continue
        s = predict(model, fs, cfg, device, amp)
        m = M.binary_metrics(fs.labels, s, video_ids=fs.videos, threshold=cfg.eval.threshold)
        res[dom.name] = {k: m[k] for k in ("auc", "video_auc", "eer", "ap", "acc", "eer_threshold", "n_pos",
                                           "n_neg", "n_videos")}
        raw[dom.name] = (fs.labels, s, fs.videos, fs.paths)
    return res, raw


def _mean(vals):
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def summarize(per_domain):
    return {f"{k}_mean": _mean([m[k] for m in per_domain.values()]) for k in ("auc", "video_auc", "eer", "ap", "acc")}


# --------------------------------------------------------------------------------- training
def _model_file(state, cfg, step, which):
    return {"format": "roga_cuda.image.model/1", "app": "image", "model": state, "config": cfg.to_dict(),
            "step": int(step), "which": which}


class ImageTrainer(Trainer):
    app = "image"
    log_name = eval_log_name = "log.csv"
    log_windows = True
    loss_key = "train_loss"

    def check_config(self, cfg):
        if cfg.method not in METHODS:
            raise ValueError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
        t = cfg.train
        if int(t.steps) < 1:
            raise ValueError(f"train.steps must be >= 1, got {t.steps}")
        bs = int(t.batch_size)
        if bs < 2 or bs % 2:
            raise ValueError(f"train.batch_size must be even and >= 2 (half real, half fake), got {bs}")
        if t.monitor not in MONITORS:
            raise ValueError(f"train.monitor must be one of {', '.join(MONITORS)}, got {t.monitor!r}")
        if int(t.eval_every) < 0 or int(t.log_every) < 1 or int(t.checkpoint_every) < 0:
            raise ValueError("train.eval_every and train.checkpoint_every must be >= 0 and train.log_every >= 1")
        if cfg.eval.select not in ("best", "last"):
            raise ValueError(f"eval.select must be best or last, got {cfg.eval.select!r}")
        self.monitor_mode = "min" if t.monitor == "eer" else "max"
        self.monitor_key = f"val_{t.monitor}_mean"
        if t.fsdp:  # settings that FSDP2 cannot take, refused before anything is built
            o = cfg.optim
            if o.sam_sync_first_pass:
                raise ValueError("optim.sam_sync_first_pass is a DDP setting; with train.fsdp=true every backward "
                                 "pass is reduce-scattered (SAM's ascent uses the global batch's gradient)")
            if cfg.method == "roga" and o.alignment == "hvp":
                raise ValueError("optim.alignment=hvp is not supported with train.fsdp=true (double backward through "
                                 "FSDP); use optim.alignment=first_order")
            if o.strategy == "swap":
                raise ValueError("optim.strategy=swap is not possible with train.fsdp=true (FSDP owns the parameters' "
                                 "storage); use auto or copy")

    def build_data(self):
        data = build_image_data(self.cfg)
        self.log(f"[data] {data.source}: {len(data.train_domains)} training domain(s), "
                 f"{len(data.test_domains)} held-out")
        for dom in data.train_domains + data.test_domains:
            self.log(f"[data]   {dom}")
        return data

    def build_model(self):
        return model_from_config(self.cfg, self.device)

    def build_optimizer(self):
        return build_optimizer(self.cfg, self.params, len(self.data.train_domains))

    def plan_steps(self):
        return int(self.cfg.train.steps)

    @property
    def best_path(self):
        return os.path.join(self.out, "best.pt")

    def stale_outputs(self):
        return [self.best_path]

    def start(self):
        cfg, d = self.cfg, self.dist
        half = int(cfg.train.batch_size) // 2
        feeds = []
        for dom in self.data.train_domains:
            real, fake = dom.real_fake("train")
            feeds.append([(fs, BatchStream(len(fs), half, cfg.seed, f"{dom.name}/{tag}", rank=d.rank,
                                           world_size=d.world_size)) for fs, tag in ((real, "real"), (fake, "fake"))])
        self.val_domains = [dom for dom in self.data.train_domains if "val" in dom.splits]
        self.stepper = _Stepper(cfg, self.net, self.opt, self.amp, self.ddp is not None)
        self.batches = _step_batches(feeds, self.step, self.total_steps, int(cfg.data.workers))

    def train_step(self, step):
        cfg = self.cfg
        out = []
        for k, (x, y) in enumerate(next(self.batches)):
            flip = None
            if cfg.train.hflip:  # per-sample flips drawn from (seed, domain, step, rank): resume-exact
                g = make_generator(cfg.seed, "hflip", k, step, self.dist.rank)
                flip = torch.rand(x.shape[0], generator=g) < 0.5
            out.append((to_input(x, self.device, cfg.data.mean, cfg.data.std, flip), y.to(self.device)))
        return {"train_loss": self.stepper(out)}

    def eval_due(self, step):
        every = int(self.cfg.train.eval_every)
        return bool(self.val_domains) and ((every and step % every == 0) or step == self.total_steps)

    def validate(self, step):
        res, _ = evaluate_domains(self.net, self.val_domains, "val", self.cfg, self.device, self.amp)
        summ = summarize(res)
        return {**{f"val_{k}": v for k, v in summ.items()}, **{f"val_{d}_auc": m["auc"] for d, m in res.items()}}

    def after_validation(self, metrics, improved):
        if improved:  # the same on every rank (the metrics are)
            state = full_state_dict(self.model)  # under FSDP gathered on rank 0, every rank taking part
            if is_main():
                save_checkpoint(self.best_path, _model_file(state, self.cfg, self.step, "best"))
        summ = {k[4:]: v for k, v in metrics.items() if k.endswith("_mean")}
        self.say(f"[val] step {self.step}: " + " ".join(f"{k}={v:.4f}" for k, v in summ.items()) +
                 f" (best {self.cfg.train.monitor} {self.es.best:.4f} at step {self.es.best_step})")

    def finish(self):
        cfg, model = self.cfg, self.net
        state = full_state_dict(self.model)
        if is_main():
            save_checkpoint(os.path.join(self.out, "final.pt"), _model_file(state, cfg, self.step, "last"))
        del state
        barrier()  # best.pt and final.pt are complete before any rank reads them
        selected = {"which": "last", "step": self.step}
        if cfg.eval.select == "best" and os.path.isfile(self.best_path):
            best = load_checkpoint(self.best_path, map_location=self.device)
            load_full_state_dict(self.model, best["model"])
            selected = {"which": "best", "step": int(best["step"]), "val_metric": cfg.train.monitor,
                        "val_value": self.es.best}
        in_dom, raw_in = evaluate_domains(model, self.data.train_domains, "test", cfg, self.device, self.amp)
        cross, raw_x = evaluate_domains(model, self.data.test_domains, "test", cfg, self.device, self.amp)
        result = {
            "method": cfg.method, "model": cfg.model.arch, "seed": int(cfg.seed), "steps": self.step,
            "stopped_early": self.stopped_early, "selected": selected, "train_time_s": self.train_time,
            "world_size": self.dist.world_size, "device": str(self.device),
            "in_domain": in_dom, "cross_domain": cross,
            "summary": {"in_domain": summarize(in_dom), "cross_domain": summarize(cross)},
            "skipped_corrupt": getattr(self.data, "skipped", 0), "data_time_s": self.data_time,
            "wall_time_s": time.time() - self.t_created,
        }
        if is_main():
            _write_outputs(self.out, result, raw_in, raw_x, cfg)
        barrier()
        return result


def train(cfg, out_dir, resume=None, data=None, log=print0):
    """Train per ``cfg`` into ``out_dir``; returns the metrics dict (also metrics.json)."""
    return ImageTrainer(cfg, out_dir, data=data, log=log).fit(resume)


class _StepData(torch.utils.data.Dataset):
    """Item i = the uint8 batches of every training domain for step ``start + i`` (so
    DataLoader workers can load whole steps ahead, in order)."""

    def __init__(self, feeds, start, total):
        self.feeds, self.start, self.total = feeds, start, total

    def __len__(self):
        return self.total - self.start

    def __getitem__(self, i):
        step = self.start + i
        out = []
        for pair in self.feeds:
            xs, ys = zip(*(fs.batch(stream.indices(step)) for fs, stream in pair))
            out.append((torch.cat(xs), torch.cat(ys)))
        return out


def _step_batches(feeds, start, total, workers):
    data = _StepData(feeds, start, total)
    in_memory = all(fs.in_memory for pair in feeds for fs, _ in pair)
    if in_memory or workers <= 0:
        return (data[i] for i in range(len(data)))
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=2)
    return iter(loader)


def _write_outputs(out_dir, result, raw_in, raw_x, cfg):
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=float)
    curves = {f"{d} (in-domain)": (r[0], r[1]) for d, r in raw_in.items()}
    curves.update({f"{d} (held out)": (r[0], r[1]) for d, r in raw_x.items()})
    if curves:
        plot_roc(curves, os.path.join(out_dir, "roc.png"), title=f"ROC, {result['method']} ({result['model']})")
        plot_det(curves, os.path.join(out_dir, "det.png"), title=f"DET, {result['method']}")
    log_path = os.path.join(out_dir, "log.csv")
    if os.path.isfile(log_path):
        cols = read_log(log_path)
        keys = [k for k in ("train_loss", "lr", "val_auc_mean", "val_eer_mean", "sec_per_step") if k in cols]
        plot_training_curves(cols, os.path.join(out_dir, "training_curves.png"), keys=keys,
                             title=f"training, {result['method']}")
    if cfg.eval.save_scores:
        write_scores(os.path.join(out_dir, "scores"), {**raw_in, **raw_x})


def write_scores(folder, raw):
    """scores/<domain>.csv: video, label (1 = fake), score[, path]."""
    import csv
    os.makedirs(folder, exist_ok=True)
    for dom, (labels, scores, videos, paths) in raw.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dom)
        with open(os.path.join(folder, f"{safe}.csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["video", "label", "score"] + (["path"] if paths is not None else []))
            for i in range(len(labels)):
                w.writerow([videos[i], int(labels[i]), f"{scores[i]:.6f}"] + ([paths[i]] if paths is not None else []))
