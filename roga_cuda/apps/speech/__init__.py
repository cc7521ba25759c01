"""Speech deepfake detection with dual-path data augmentation (DPDA) and gradient alignment.

* :mod:`.rawboost` — RawBoost (LnL, ISD, SSI; configurations 0-8) in torch, batched, on the device.
* :mod:`.synth`    — SynthSpoof, the built-in synthetic bona fide / spoof corpus.
* :mod:`.data`     — synthetic, ASVspoof 2019 LA and In-the-Wild sets.
* :mod:`.models`   — AASIST-style and RawNet2-style countermeasures, optional SSL front end.
* :mod:`.scoring`  — per-attack EER, ASVspoof 2019 min t-DCF, score files.
* :mod:`.train`    — baseline and DPDA training (PCGrad family), evaluation.
* :mod:`.cli`      — ``dpda-train`` and ``dpda-eval``.
"""
