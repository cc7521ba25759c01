"""The image detector's training loop: ERM, SAM (or GSAM, WSAM, Friendly-SAM, LookSAM) or RoGA
over K training domains.

Every step draws one batch per training domain (half real, half fake; the batches are a
pure function of the step, see ``common.training.BatchStream``). ERM and SAM train on the
K batches concatenated; RoGA runs its per-domain cycle (backward, perturb, backward at
the perturbed point with BatchNorm statistics frozen, accumulate) and steps once.
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

from ...optim import GSAM, SAM, WSAM, FriendlySAM, LookSAM, RoGA, clip_grad_norm_, freeze_bn_stats
from ..common import metrics as M
from ..common.checkpoint import save_checkpoint
from ..common.config import save_config
from ..common.plots import plot_det, plot_roc, plot_training_curves
from ..common.runtime import (Amp, all_gather_objects, barrier, init_distributed, is_main, make_generator, print0,
                              progress, seed_everything, select_device, set_num_threads)
from ..common.training import (BatchStream, Checkpointer, EarlyStopping, MetricLogger, build_scheduler, capture_state,
                               read_log, restore_state, unwrap_model)
from .data import build_image_data, to_input
from .models import build_model

__all__ = ["train", "make_optimizer", "evaluate_domains", "predict", "summarize"]

OPTIMIZERS = ("erm", "sam", "gsam", "wsam", "fsam", "looksam", "roga")
SAM_FAMILY = ("sam", "gsam", "wsam", "fsam", "looksam")  # first_step / second backward / second_step


def make_optimizer(cfg, params, num_domains):
    o = cfg.optim
    name = cfg.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if o.base == "sgd":
        base, kw = torch.optim.SGD, dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                         nesterov=o.nesterov)
    elif o.base in ("adam", "adamw"):
        base = torch.optim.Adam if o.base == "adam" else torch.optim.AdamW
        kw = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    else:
        raise ValueError(f"unknown optim.base {o.base!r}; choose sgd, adam or adamw")
    params = [p for p in params if p.requires_grad]
    if name == "erm":
        return base(params, **kw)
    common = dict(backend=o.backend, strategy=o.strategy, max_grad_norm=o.max_grad_norm)
    if name == "looksam":  # its k is its interval
        if o.interval != 1:
            raise ValueError("optimizer=looksam: set its SAM-step period with optim.looksam_k, not optim.interval")
        return LookSAM(params, base, rho=o.rho, k=o.looksam_k, alpha=o.looksam_alpha, adaptive=o.adaptive,
                       **common, **kw)
    common["interval"] = o.interval
    if name == "roga":
        return RoGA(params, base, rho=o.rho, alpha=o.alpha, alignment=o.alignment, num_domains=num_domains,
                    **common, **kw)
    variant = {"sam": (SAM, {}), "gsam": (GSAM, dict(alpha=o.gsam_alpha)), "wsam": (WSAM, dict(gamma=o.wsam_gamma)),
               "fsam": (FriendlySAM, dict(sigma=o.fsam_sigma, lmbda=o.fsam_lmbda))}
    cls, extra = variant[name]
    return cls(params, base, rho=o.rho, adaptive=o.adaptive, **extra, **common, **kw)


def _bce(logits, y):
    return F.binary_cross_entropy_with_logits(logits.float().squeeze(1), y.float())


class _Stepper:
    """One optimisation step of ERM / SAM / RoGA, with AMP, clipping and DDP handled."""

    def __init__(self, cfg, model, opt, amp, ddp):
        self.cfg, self.model, self.opt, self.amp, self.ddp = cfg, model, opt, amp, ddp
        self.kind = cfg.optimizer
        self.hvp = cfg.optimizer == "roga" and cfg.optim.alignment == "hvp"

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
    each rank scores a shard and every rank gets all scores."""
    from ..common.runtime import rank, world_size
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    r, w = rank(), world_size()
    idx = np.arange(len(frames))[r::w]
    bs = int(cfg.eval.batch_size)
    out = []
    mean, std = cfg.data.mean, cfg.data.std
    if frames.in_memory or cfg.train.num_workers == 0:
        chunks = (frames.batch(idx[i:i + bs])[0] for i in range(0, len(idx), bs))
    else:
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(frames, idx.tolist()), batch_size=bs,
                                             num_workers=int(cfg.train.num_workers))
        chunks = (x for x, _ in loader)
    ctx = amp.autocast() if amp is not None else contextlib.nullcontext()
    for x in chunks:
        with ctx:
            logits = net(to_input(x, device, mean, std))
        out.append(torch.sigmoid(logits.float().squeeze(1)).cpu())
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
def _model_file(model, cfg, step, which):
    return {"format": "roga_cuda.image.model/1", "model": unwrap_model(model).state_dict(), "config": cfg.to_dict(),
            "step": int(step), "which": which}


def train(cfg, out_dir, resume=None, log=print0):
    """Train per ``cfg`` into ``out_dir``; returns the metrics dict (also metrics.json)."""
    t_start = time.time()
    set_num_threads(cfg.num_threads)
    device = select_device(cfg.device)
    dist_info = init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = select_device(f"cuda:{dist_info.local_rank % torch.cuda.device_count()}")
    seed_everything(cfg.seed, cfg.train.deterministic)
    if is_main():
        os.makedirs(out_dir, exist_ok=True)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
    t0 = time.time()
    data = build_image_data(cfg)
    t_data = time.time() - t0
    K = len(data.train_domains)
    log(f"[data] {data.source}: {K} training domain(s), {len(data.test_domains)} held-out ({t_data:.1f} s)")
    for dom in data.train_domains + data.test_domains:
        log(f"[data]   {dom}")
    model = build_model(cfg.model.arch, int(cfg.data.image_size), cfg.model.width, cfg.model.pretrained,
                        float(cfg.model.dropout), int(cfg.model.xception_middle_blocks)).to(device)
    if dist_info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(cfg, model.parameters(), K)
    tr = cfg.train
    sched = build_scheduler(opt, tr.schedule, int(tr.steps), int(tr.warmup_steps), float(tr.min_lr_ratio),
                            int(tr.step_size) or None, float(tr.gamma))
    amp = Amp(device, tr.amp, tr.amp_dtype)
    es_mode = "min" if tr.early_stopping_metric == "eer" else "max"
    if tr.early_stopping_metric not in ("auc", "eer", "video_auc", "ap"):
        raise ValueError(f"train.early_stopping_metric must be auc, eer, video_auc or ap, got {tr.early_stopping_metric!r}")
    es = EarlyStopping(int(tr.early_stopping_patience), es_mode)
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), int(tr.checkpoint_every), int(tr.keep_checkpoints))
    step = 0
    state, rpath = ckpt.load(resume)
    best_path = os.path.join(out_dir, "best.pt")
    if state is None:
        if resume:
            log(f"[resume] no checkpoint in {ckpt.folder}: starting from step 0")
        from ..common.checkpoint import latest_checkpoint
        stale = latest_checkpoint(ckpt.folder)
        if stale is not None:  # its step files would be mistaken for this run's (resume, pruning)
            raise ValueError(f"{out_dir} holds checkpoints of an earlier run ({stale}); pass --resume to continue "
                             "it, or choose another --out")
        if is_main() and os.path.exists(best_path):
            os.unlink(best_path)  # an earlier run's best weights must not be evaluated as this run's
    if state is not None:
        if state.get("config", {}).get("optimizer") not in (None, cfg.optimizer):
            raise ValueError(f"--resume {rpath}: checkpoint was trained with optimizer "
                             f"{state['config']['optimizer']!r}, this run uses {cfg.optimizer!r}")
        step = int(restore_state(state, model=model, optimizer=opt, scheduler=sched, amp=amp, early_stopping=es)["step"])
        log(f"[resume] {rpath}: continuing at step {step}")
    logger = MetricLogger(out_dir, tensorboard=cfg.log.tensorboard, resume_step=step if state is not None else None)
    bs = int(tr.batch_size)
    if bs < 2 or bs % 2:
        raise ValueError(f"train.batch_size must be even and >= 2 (half real, half fake), got {bs}")
    feeds = []
    for dom in data.train_domains:
        real, fake = dom.real_fake("train")
        feeds.append([(fs, BatchStream(len(fs), bs // 2, cfg.seed, f"{dom.name}/{tag}", rank=dist_info.rank,
                                       world_size=dist_info.world_size)) for fs, tag in ((real, "real"), (fake, "fake"))])
    val_domains = [d for d in data.train_domains if "val" in d.splits]
    stepper = _Stepper(cfg, model, opt, amp, dist_info.enabled)
    mean, std = cfg.data.mean, cfg.data.std
    total = int(tr.steps)
    loss_sum, loss_n, t_log, t_train = 0.0, 0, time.time(), 0.0
    stopped_early = False

    def to_device(step, raw):
        out = []
        for d, (x, y) in enumerate(raw):
            flip = None
            if tr.hflip:
                g = make_generator(cfg.seed, "hflip", d, step, dist_info.rank)
                flip = torch.rand(x.shape[0], generator=g) < 0.5
            out.append((to_input(x, device, mean, std, flip), y.to(device)))
        return out

    def validate(step):
        res, _ = evaluate_domains(model, val_domains, "val", cfg, device, amp)
        summ = summarize(res)
        logger.log(step, **{f"val_{k}": v for k, v in summ.items()},
                   **{f"val_{d}_auc": m["auc"] for d, m in res.items()})
        value = summ[f"{tr.early_stopping_metric}_mean"]
        if es.update(value, step) and is_main():
            save_checkpoint(best_path, _model_file(model, cfg, step, "best"))
        barrier()
        log(f"[val] step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in summ.items()) +
            f" (best {tr.early_stopping_metric} {es.best:.4f} at step {es.best_step})")

    # With AMP the GradScaler skips the first steps while it calibrates, which makes torch
    # warn that the scheduler stepped before the optimizer; expected here, not a bug.
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
    bar = progress(total=total, initial=step, desc=f"{cfg.optimizer}", enabled=bool(tr.progress))
    batches = _step_batches(feeds, step, total, int(tr.num_workers))
    while step < total:
        raw = next(batches)
        t_step = time.time()
        loss = stepper(to_device(step, raw))
        sched.step()
        step += 1
        loss_sum = loss_sum + loss  # a device tensor: no host sync per step
        loss_n += 1
        t_train += time.time() - t_step
        bar.update(1)
        if step % int(tr.log_every) == 0 or step == total:
            lr = opt.param_groups[0]["lr"]
            dt = (time.time() - t_log) / max(1, loss_n)
            mean_loss = float(loss_sum) / max(1, loss_n)
            if not math.isfinite(mean_loss) and not amp.enabled:
                log(f"[warn] step {step}: training loss is {mean_loss} (diverged? lower optim.lr or set "
                    "optim.max_grad_norm)")
            logger.log(step, train_loss=mean_loss, lr=lr, sec_per_step=dt)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2g}")
            loss_sum, loss_n, t_log = 0.0, 0, time.time()
        if val_domains and ((tr.eval_every and step % int(tr.eval_every) == 0) or step == total):
            validate(step)
            if es.should_stop:
                stopped_early = True
        if ckpt.due(step) or (stopped_early and tr.checkpoint_every):
            ckpt.save(step, capture_state(model=model, optimizer=opt, scheduler=sched, amp=amp, early_stopping=es,
                                          counters={"step": step}, config=cfg))
        if stopped_early:
            log(f"[early stop] no {tr.early_stopping_metric} improvement in {es.patience} evaluations; "
                f"stopping at step {step}")
            break
    bar.close()
    if is_main():
        save_checkpoint(os.path.join(out_dir, "final.pt"), _model_file(model, cfg, step, "last"))
    barrier()
    selected = {"which": "last", "step": step}
    if cfg.eval.select == "best" and os.path.isfile(best_path):
        from ..common.checkpoint import load_checkpoint
        best = load_checkpoint(best_path, map_location=device)
        unwrap_model(model).load_state_dict(best["model"])
        selected = {"which": "best", "step": int(best["step"]), "val_metric": tr.early_stopping_metric,
                    "val_value": es.best}
    elif cfg.eval.select not in ("best", "last"):
        raise ValueError(f"eval.select must be best or last, got {cfg.eval.select!r}")
    in_dom, raw_in = evaluate_domains(model, data.train_domains, "test", cfg, device, amp)
    cross, raw_x = evaluate_domains(model, data.test_domains, "test", cfg, device, amp)
    result = {
        "optimizer": cfg.optimizer, "model": cfg.model.arch, "steps": step, "stopped_early": stopped_early,
        "selected": selected, "wall_time_s": time.time() - t_start, "train_time_s": t_train,
        "data_time_s": t_data, "world_size": dist_info.world_size, "device": str(device),
        "in_domain": in_dom, "cross_domain": cross,
        "summary": {"in_domain": summarize(in_dom), "cross_domain": summarize(cross)},
        "skipped_corrupt": getattr(data, "skipped", 0),
    }
    if is_main():
        _write_outputs(out_dir, result, raw_in, raw_x, cfg)
    logger.close()
    barrier()
    return result


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
        plot_roc(curves, os.path.join(out_dir, "roc.png"), title=f"ROC, {result['optimizer']} ({result['model']})")
        plot_det(curves, os.path.join(out_dir, "det.png"), title=f"DET, {result['optimizer']}")
    log_path = os.path.join(out_dir, "log.csv")
    if os.path.isfile(log_path):
        cols = read_log(log_path)
        keys = [k for k in ("train_loss", "lr", "val_auc_mean", "val_eer_mean", "sec_per_step") if k in cols]
        plot_training_curves(cols, os.path.join(out_dir, "training_curves.png"), keys=keys,
                             title=f"training, {result['optimizer']}")
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
