"""Infrastructure shared by the training apps (image: RoGA; speech: DPDA + PCGrad).

* :mod:`.metrics`    — ROC/DET curves, AUC, EER, AP, accuracy, video-level AUC (numpy).
* :mod:`.checkpoint` — atomic save, load with clear errors, latest, parameter averaging.
* :mod:`.config`     — YAML presets (``apps/<app>/presets/default.yaml`` is the schema) +
  ``a.b=value`` overrides.
* :mod:`.runtime`    — seeding/RNG state, device, AMP, DDP via torchrun, rank-0 printing/tqdm.
* :mod:`.training`   — LR schedules, early stopping, resumable data order, CSV/TensorBoard
  log, exact resume (capture_state/restore_state, Checkpointer).
* :mod:`.plots`      — ROC/DET/training-curve PNGs.
"""
from .checkpoint import (CheckpointError, average_checkpoints, checkpoint_path, latest_checkpoint, load_checkpoint,
                         prune_checkpoints, save_checkpoint)
from .config import Config, ConfigError, list_presets, load_config, save_config
from .metrics import accuracy, average_precision, binary_metrics, det_curve, eer, roc_auc, roc_curve, video_auc
from .runtime import (Amp, DistInfo, cleanup_distributed, derive_seed, get_rng_state, init_distributed, is_main,
                      make_generator, print0, progress, seed_everything, select_device, set_rng_state)
from .training import (BatchStream, Checkpointer, EarlyStopping, EpochSampler, MetricLogger, build_scheduler,
                       capture_state, lr_factor, read_log, restore_state, unwrap_model)

__all__ = [
    "CheckpointError", "average_checkpoints", "checkpoint_path", "latest_checkpoint", "load_checkpoint",
    "prune_checkpoints", "save_checkpoint", "Config", "ConfigError", "list_presets", "load_config", "save_config",
    "accuracy", "average_precision", "binary_metrics", "det_curve", "eer", "roc_auc", "roc_curve", "video_auc",
    "Amp", "DistInfo", "cleanup_distributed", "derive_seed", "get_rng_state", "init_distributed", "is_main",
    "make_generator", "print0", "progress", "seed_everything", "select_device", "set_rng_state",
    "BatchStream", "Checkpointer", "EarlyStopping", "EpochSampler", "MetricLogger", "build_scheduler",
    "capture_state", "lr_factor", "read_log", "restore_state", "unwrap_model",
]
