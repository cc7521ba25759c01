"""The training skeleton both apps share: runtime set-up, the step loop, logging,
validation with early stopping, exact checkpoint/resume and the progress bar.

An app subclasses :class:`Trainer` and supplies its data, model, optimizer, one training
step, validation and final evaluation (``build_data``, ``build_model``,
``build_optimizer``, ``plan_steps``, ``train_step``, ``validate``, ``finish``); the
skeleton owns everything else, so both apps checkpoint, resume, log and stop the same way.

The loop::

    for step in range(start, total):
        record = train_step(step)          # 0-d device tensors: no host sync per step
        scheduler.step()
        every log_every steps (and before validating): write the pending records
        if eval_due(step): validate -> early stopping, best-model hook, eval log
        if a checkpoint is due: save everything, pending records included

A checkpoint holds the model, optimizer, scheduler, GradScaler, early stopping, RNG
states, the not yet written log records and the app's own state (``app_state``), so a
resumed run writes the same logs and ends with the same weights as an uninterrupted one
(bit-identical on CPU).

Processes: one; DDP under ``torchrun`` (more than one process); or, with
``train.fsdp=true``, FSDP2: the model is ``fully_shard``-ed block by block
(:mod:`.sharding`), the roga_cuda optimizers run on its DTensor shards, checkpoints are
sharded ``step_<N>/`` folders (``torch.distributed.checkpoint``; they resume on another
number of processes too), and the model files (best/final/averaged) hold the whole model,
gathered on rank 0, so they load in one process as before. One process with
``train.fsdp=true`` runs on a one-process group.
"""
import math
import os
import shutil
import time
import warnings

import torch

from .checkpoint import CheckpointError, latest_checkpoint
from .runtime import (Amp, all_gather_objects, barrier, cleanup_distributed, get_rng_state, init_distributed, is_main,
                      print0, progress, seed_everything, select_device, set_num_threads, set_rng_state)
from .sharding import shard_model, shard_units, sync_buffers
from .training import Checkpointer, EarlyStopping, MetricLogger, build_scheduler, capture_state, restore_state
from .config import save_config

__all__ = ["Trainer", "RuntimeInfo", "setup_runtime", "make_optimizer", "check_app", "BASE_OPTIMIZERS",
           "CHECKPOINT_FORMAT", "SCHEDULER_WARNING"]

BASE_OPTIMIZERS = ("sgd", "adam", "adamw")
CHECKPOINT_FORMAT = "roga_cuda.train/2"
# torch's warning when a GradScaler-skipped step is followed by scheduler.step() (a regex)
SCHEDULER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


# ----------------------------------------------------------------------------- runtime
class RuntimeInfo:
    """Where a run executes: device, DDP info and AMP."""

    def __init__(self, device, dist, amp):
        self.device, self.dist, self.amp = device, dist, amp


def setup_runtime(cfg):
    """Threads, process group (under torchrun; with ``train.fsdp`` always, one process too),
    device, seeds and AMP from ``cfg.runtime``."""
    rt = cfg.runtime
    wants_cuda = str(rt.device).startswith("cuda") or (rt.device == "auto" and torch.cuda.is_available())
    dist = init_distributed("cuda" if wants_cuda else "cpu", single_group=fsdp_enabled(cfg))
    threads = rt.threads
    if not threads and dist.enabled and not wants_cuda:  # N CPU processes share the cores instead of N x all
        local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        threads = max(1, (os.cpu_count() or 1) // max(1, local))
    set_num_threads(threads)
    device = select_device(rt.device, dist.local_rank)
    seed_everything(cfg.seed, rt.deterministic)
    return RuntimeInfo(device, dist, Amp(device, rt.amp, rt.amp_dtype))


def fsdp_enabled(cfg):
    return bool(cfg.train.get("fsdp", False))


def make_optimizer(o, params, wrapper=None, **wrapper_kw):
    """The base optimizer named ``o.name`` (sgd | adam | adamw) with ``o``'s hyper-parameters,
    wrapped in ``wrapper`` (SAM, RoGA, PCGrad) with ``wrapper_kw`` when given."""
    params = [p for p in params if p.requires_grad]
    if o.name == "sgd":
        base, kw = torch.optim.SGD, dict(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                         nesterov=o.nesterov)
    elif o.name in ("adam", "adamw"):
        base = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        kw = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    else:
        raise ValueError(f"unknown optim.name {o.name!r}; choose one of {', '.join(BASE_OPTIMIZERS)}")
    if wrapper is None:
        return base(params, **kw)
    return wrapper(params, base, **wrapper_kw, **kw)


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """One training run into ``out_dir``; ``fit(resume)`` returns the app's result dict."""

    app = None                 # "image" | "speech": recorded in checkpoints, checked on resume
    log_name = "log.csv"       # training records
    eval_log_name = "log.csv"  # validation records (the same file or another)
    log_windows = True         # True: one row per log_every window (means); False: one row per step
    checkpoint_on_eval = False  # also checkpoint after every validation (the speech app's epoch ends)
    loss_key = "loss"          # the training record checked for divergence and shown on the bar
    monitor_key = None         # key of validate()'s result that early stopping watches
    monitor_mode = "max"       # how that value improves: "max" or "min"
    tiebreak_key = None        # optional: lower wins when the monitored values are equal

    def __init__(self, cfg, out_dir, data=None, log=print0):
        self.t_created = time.time()  # the run's wall time counts from here
        self.check_config(cfg)
        self.fsdp = fsdp_enabled(cfg)
        if self.fsdp and cfg.runtime.get("channels_last", False):
            raise ValueError("runtime.channels_last is not supported with train.fsdp=true (FSDP2 shards contiguous "
                             "parameters only)")
        self.cfg, self.out, self.log = cfg, out_dir, log
        self.rt = setup_runtime(cfg)
        self.device, self.dist, self.amp = self.rt.device, self.rt.dist, self.rt.amp
        try:
            self._build(cfg, out_dir, data)
        except BaseException:
            if self.dist.created:  # the one-process group train.fsdp started: not left behind
                cleanup_distributed()
            raise

    def _build(self, cfg, out_dir, data):
        self.data = data if data is not None else self.build_data()
        self.data_time = time.time() - self.t_created
        self.model = self.build_model().to(self.device)
        self.ddp = None
        if self.fsdp:  # sharded in place: self.model is the FSDP module
            shard_model(self.model, self.shard_units())
        elif self.dist.enabled:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = self.ddp or self.model  # what the forward passes go through
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = self.build_optimizer()
        self.total_steps = int(self.plan_steps())
        if self.total_steps < 1:
            raise ValueError(f"this run has {self.total_steps} training steps; train.steps (and train.epochs) "
                             "must give at least one")
        o, t = cfg.optim, cfg.train
        self.sched = build_scheduler(self.opt, o.schedule, self.total_steps, int(o.warmup_steps),
                                     float(o.min_lr_ratio), int(o.step_size) or None, float(o.gamma))
        self.es = EarlyStopping(int(t.patience), self.monitor_mode)
        self.ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), int(t.checkpoint_every),
                                 int(t.keep_checkpoints))
        self.prepare()
        self.step = 0
        self.pending = []          # per-step records not yet written to the log
        self.train_time = 0.0      # seconds in the loop (steps and validation), across resumes
        self.stopped_early = False
        self.train_log = self.eval_log = None

    # ---------------------------------------------------------------- app interface
    label = property(lambda self: self.cfg.method)  # the run's name in logs, bars, checkpoints

    def check_config(self, cfg):
        """Reject bad settings before anything is built (ValueError naming the key)."""

    def build_data(self):
        raise NotImplementedError

    def build_model(self):
        raise NotImplementedError

    def build_optimizer(self):
        raise NotImplementedError

    def shard_units(self):
        """train.fsdp: the blocks ``fully_shard``-ed one by one before the root."""
        return shard_units(self.model)

    def sync_buffers(self):
        """train.fsdp: rank 0's BatchNorm statistics to every rank (see :mod:`.sharding`);
        before validation, checkpoints and the final evaluation. DDP needs none (it
        broadcasts them at every forward)."""
        if self.fsdp:
            sync_buffers(self.model)

    def plan_steps(self):
        """Total number of training steps."""
        raise NotImplementedError

    def prepare(self):
        """The rest of the app's set-up (after the optimizer and the step plan)."""

    def start(self):
        """Called once before the first step of this process (after a resume: at ``self.step``)."""

    def train_step(self, step):
        """One optimisation step; returns {name: 0-d tensor or number} for the log."""
        raise NotImplementedError

    def eval_due(self, step):
        """Validate after ``step`` steps?"""
        return False

    def validate(self, step):
        """Validation metrics after ``step`` steps (logged to the eval log)."""
        raise NotImplementedError

    def after_validation(self, metrics, improved):
        """Keep the best model, print a line, ... (``improved``: a new best)."""

    def app_state(self):
        """The app's own loop state, for checkpoints (plain containers/tensors)."""
        return {}

    def load_app_state(self, state):
        pass

    def stale_outputs(self):
        """Files or folders of an earlier run in ``out`` that a fresh run must not reuse."""
        return []

    def finish(self):
        """Final evaluation and outputs; returns the result dict."""
        raise NotImplementedError

    def log_rows(self, rows):
        """Hook: the rows just written to the training log (plain numbers)."""

    # ------------------------------------------------------------------------- loop
    def fit(self, resume=None):
        try:
            return self._fit(resume)
        finally:
            if self.dist.created:  # the one-process group train.fsdp started
                cleanup_distributed()

    def _fit(self, resume):
        state, path = self.ckpt.load(resume) if resume else (None, None)
        if state is None:
            self._fresh_start(resume)
        else:
            self._restore(state, path)
        if is_main():
            save_config(self.cfg, os.path.join(self.out, "config.yaml"))
        resume_step = self.step if state is not None else None
        rt = self.cfg.runtime
        self.train_log = MetricLogger(self.out, self.log_name, tensorboard=rt.tensorboard, resume_step=resume_step)
        self.eval_log = self.train_log if self.eval_log_name == self.log_name else \
            MetricLogger(self.out, self.eval_log_name, tensorboard=False, resume_step=resume_step)
        self.start()
        bar = progress(total=self.total_steps, initial=self.step, desc=self.label, enabled=bool(rt.progress))
        self.bar = bar
        try:
            with warnings.catch_warnings():
                # With AMP the GradScaler skips the first steps while it calibrates, which makes torch
                # warn that the scheduler stepped before the optimizer; expected here, not a bug.
                warnings.filterwarnings("ignore", message=SCHEDULER_WARNING)
                self._loop(bar)
        finally:
            bar.close()
            self.bar = None
            self.train_log.close()
            self.eval_log.close()
        self.sync_buffers()
        return self.finish()

    def _loop(self, bar):
        log_every = max(1, int(self.cfg.train.log_every))
        t_start, self._t_window = time.time() - self.train_time, time.time()
        while self.step < self.total_steps and not self.stopped_early:
            rec = dict(self.train_step(self.step))
            self.sched.step()
            self.step += 1
            rec["step"] = self.step  # rows are numbered by steps done (as checkpoints are)
            self.pending.append(rec)
            bar.update(1)
            validate = self.eval_due(self.step)
            if len(self.pending) >= log_every or validate or self.step == self.total_steps:
                self._flush()
            if validate:
                self._validate()
            self.train_time = time.time() - t_start
            if self.ckpt.due(self.step) or (validate and self.checkpoint_on_eval) or \
                    (self.stopped_early and self.ckpt.every):
                self._save_checkpoint()
            if self.stopped_early:
                self.say(f"[{self.label}] early stop: no better {self.monitor_key} in {self.es.patience} "
                         f"evaluation(s); stopping at step {self.step}")
                break

    def say(self, text):
        """Print a line without breaking the progress bar."""
        bar = getattr(self, "bar", None)
        if bar is not None and self.log is print0 and hasattr(bar, "write"):
            if is_main():
                bar.write(text)
        else:
            self.log(text)

    def _flush(self):
        if not self.pending:
            return
        lr = self.opt.param_groups[0]["lr"]
        if self.log_windows:  # one row: the window's means (summed in step order: resume-exact)
            n = len(self.pending)
            row = {}
            for k in (k for k in self.pending[0] if k != "step"):
                total = 0.0
                for r in self.pending:
                    total = total + r[k]
                row[k] = float(total) / n
            row["lr"] = lr
            row["sec_per_step"] = (time.time() - self._t_window) / n
            rows = [(self.step, row)]
        else:
            rows = [(r["step"], {k: _number(v) for k, v in r.items() if k != "step"}) for r in self.pending]
        for step, row in rows:
            self.train_log.log(step, **row)
        loss = rows[-1][1].get(self.loss_key)
        if loss is not None and not math.isfinite(loss) and not self.amp.enabled:
            self.say(f"[warn] step {self.step}: training loss is {loss} (diverged? lower optim.lr or set "
                     "optim.max_grad_norm)")
        if hasattr(self.bar, "set_postfix") and loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2g}")
        self.log_rows([r for _, r in rows])
        self.pending = []
        self._t_window = time.time()

    def _validate(self):
        self.sync_buffers()
        metrics = self.validate(self.step)
        value = metrics[self.monitor_key]
        tie = metrics.get(self.tiebreak_key) if self.tiebreak_key else None
        improved = self.es.update(value, self.step, tie)
        self.eval_log.log(self.step, **metrics)
        self.after_validation(metrics, improved)
        barrier()
        if self.es.should_stop:
            self.stopped_early = True

    # -------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self):
        if not self.fsdp:
            return self.ckpt.save(self.step, self._state())
        from ...optim.checkpoint import get_state_dict
        self.sync_buffers()  # the statistics every rank resumes with
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        counters = {"step": self.step, "train_time": self.train_time, "stopped_early": self.stopped_early,
                    "total_steps": self.total_steps}
        meta = {"format": CHECKPOINT_FORMAT, "app": self.app, "label": self.label, "sharded": True,
                "world_size": self.dist.world_size, "scheduler": self.sched.state_dict(),
                "scaler": self.amp.state_dict(), "early_stopping": self.es.state_dict(),
                "rng": all_gather_objects(get_rng_state()),  # per rank
                "counters": counters, "config": self.cfg.to_dict(),
                "extra": {"pending": self.pending, "app": self.app_state()}}
        return self.ckpt.save(self.step, meta, sharded={"model": model_sd, "optim": optim_sd})

    def _state(self):
        counters = {"step": self.step, "train_time": self.train_time, "stopped_early": self.stopped_early,
                    "total_steps": self.total_steps}
        st = capture_state(model=self.model, optimizer=self.opt, scheduler=self.sched, amp=self.amp,
                           early_stopping=self.es, counters=counters, config=self.cfg,
                           extra={"pending": self.pending, "app": self.app_state()})
        st.update(format=CHECKPOINT_FORMAT, app=self.app, label=self.label)
        return st

    def _fresh_start(self, resume):
        if resume:
            self.log(f"[resume] no checkpoint in {self.ckpt.folder}: starting from step 0")
        stale = latest_checkpoint(self.ckpt.folder)
        if stale is not None:  # its step files would be mistaken for this run's (resume, pruning)
            raise ValueError(f"{self.out} holds checkpoints of an earlier run ({stale}); pass --resume to continue "
                             "it, or choose another --out")
        if is_main():
            os.makedirs(self.out, exist_ok=True)
            for p in self.stale_outputs():  # an earlier run's best weights must not be taken for this run's
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.unlink(p)
        barrier()

    def _restore(self, state, path):
        fmt, app = state.get("format"), state.get("app")
        if app is None and isinstance(state.get("config"), dict):
            app = guess_app(state["config"])
        if app is not None and app != self.app:
            raise ValueError(f"--resume {path}: this is a checkpoint of the {app} app ({APP_COMMANDS.get(app, app)}), "
                             f"not of the {self.app} app")
        if fmt != CHECKPOINT_FORMAT:
            raise CheckpointError(f"--resume {path}: checkpoint format {fmt!r} (an earlier roga_cuda version) cannot "
                                  f"be resumed by this one ({CHECKPOINT_FORMAT!r}); start a new run")
        if state.get("label") != self.label:
            raise ValueError(f"--resume {path}: the checkpoint was trained as {state.get('label')!r}, this run is "
                             f"{self.label!r}; resume with the same method")
        c = state["counters"]
        if int(c["step"]) > self.total_steps:
            raise ValueError(f"--resume {path}: the checkpoint is at step {c['step']} but this run has only "
                             f"{self.total_steps} steps; raise train.steps (or train.epochs) to at least {c['step']}, "
                             "or start a new run")
        if bool(state.get("sharded")) != self.fsdp:
            how = ("sharded (written with train.fsdp=true): resume it with train.fsdp=true" if state.get("sharded") else
                   "a whole-model checkpoint (written without train.fsdp): resume it without train.fsdp=true")
            raise ValueError(f"--resume {path}: this checkpoint is {how}")
        try:
            if self.fsdp:
                self._restore_sharded(state, path)
            else:
                restore_state(state, model=self.model, optimizer=self.opt, scheduler=self.sched, amp=self.amp,
                              early_stopping=self.es)
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. another model size
            raise ValueError(f"--resume {path}: the checkpoint does not fit this run's model/optimizer "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})") from e
        self.step, self.train_time = int(c["step"]), float(c["train_time"])
        if self.fsdp and int(state["world_size"]) != self.dist.world_size:
            self.log(f"[resume] {path} was written by {state['world_size']} process(es), this run has "
                     f"{self.dist.world_size}: resharded; the global batch is now train.batch_size x "
                     f"{self.dist.world_size}")
        self.stopped_early = bool(c["stopped_early"])
        self.pending = list(state["extra"]["pending"])
        self.load_app_state(state["extra"]["app"])
        self.log(f"[resume] {path}: continuing {self.label} at step {self.step} of {self.total_steps}")


    def _restore_sharded(self, state, path):
        """Every rank reads its shards of ``path`` (any number of ranks wrote it)."""
        from torch.distributed.checkpoint.api import CheckpointException

        from ...optim.checkpoint import load
        try:
            load(self.model, self.opt, path)
        except CheckpointException as e:  # a BaseException: made a ValueError, reported like the others
            raise ValueError(str(e).strip().splitlines()[0][:500]) from e
        self.sched.load_state_dict(state["scheduler"])
        self.amp.load_state_dict(state.get("scaler") or {})
        self.es.load_state_dict(state["early_stopping"])
        rng = state["rng"]  # this rank's RNG when the world size is the same, else rank 0's
        set_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])


APP_COMMANDS = {"image": "roga-train / roga-eval", "speech": "dpda-train / dpda-eval"}


def guess_app(config):
    """'image' or 'speech' from a stored config dict (new or old key names), else None."""
    if not isinstance(config, dict):
        return None
    if "augment" in config or config.get("method") in ("baseline", "dpda") or "mode" in config:
        return "speech"
    if config.get("method") in ("erm", "sam", "roga") or "optimizer" in config or "image_size" in config.get("data", {}):
        return "image"
    return None


def check_app(ckpt, app, path):
    """Raise a ValueError naming the right command when ``ckpt`` belongs to the other app."""
    other = ckpt.get("app") if isinstance(ckpt, dict) else None
    if other is None and isinstance(ckpt, dict):
        other = guess_app(ckpt.get("config"))
    if other is not None and other != app:
        raise ValueError(f"{path} is a checkpoint of the {other} app ({APP_COMMANDS.get(other, other)}), "
                         f"not of the {app} app")


def _number(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    return int(v) if isinstance(v, bool) else v
