"""Training and evaluation apps built on :mod:`roga_cuda.optim`.

* :mod:`roga_cuda.apps.common` — shared infrastructure (metrics, checkpoints, config,
  runtime/DDP/AMP, resume, plots).
* :mod:`roga_cuda.apps.image`  — image deepfake detection with ERM / SAM / RoGA
  (``roga-train``, ``roga-eval``).
* :mod:`roga_cuda.apps.speech` — speech deepfake detection with DPDA + PCGrad
  (``dpda-train``, ``dpda-eval``).
"""
