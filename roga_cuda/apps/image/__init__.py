"""Image deepfake detection with ERM, SAM or RoGA (issue 6).

* :mod:`.cli`       — ``roga-train`` / ``roga-eval`` (``python -m roga_cuda.apps.image``).
* :mod:`.train`     — the training loop (one batch per domain per step; AMP, DDP, resume).
* :mod:`.models`    — ResNet-34 (torchvision keys), Xception, EfficientNet-B4 (timm), Meso4.
* :mod:`.data`      — the built-in SynthFF data and the folder / DeepfakeBench JSON layouts.
* :mod:`.synthetic` — SynthFF, the procedural multi-domain face-forgery-like dataset.
"""
