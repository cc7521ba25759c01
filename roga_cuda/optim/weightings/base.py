"""The Weighting interface, the name registry, and the scaling every method shares.

A weighting maps the K x K Gram matrix ``G[i, j] = <g_i, g_j>`` of the task gradients to K
*sum-form* coefficients ``w``: the aggregated update is ``sum_k w_k g_k``. Sum form means:
K times the weights of a paper that averages (MGDA, UPGrad, IMTL-G, ...), so K identical
gradients ``g`` give ``K g`` exactly as the plain sum does. CAGrad (``(1 + c) / rescale``
times that) and Nash-MTL (``|d|`` fixed by the bargaining, then ``max_norm``) keep their
papers' scale. Each method's docstring says how ``w`` relates to its paper and to torchjd
(which mostly returns mean-form weights, ``w / K``).
"""
from typing import NamedTuple

import torch

_REGISTRY = {}


def register(*names):
    """Class decorator: make a Weighting buildable from its name(s) (the first is canonical)."""
    def deco(cls):
        for n in names:
            if n in _REGISTRY:
                raise ValueError(f"weighting name {n!r} is already registered to {_REGISTRY[n].__name__}")
            _REGISTRY[n] = cls
        cls.name = names[0]
        return cls
    return deco


def available():
    """Registered weighting names (aliases included)."""
    return sorted(_REGISTRY)


def make_weighting(spec, **options):
    """A Weighting from a name (``"mgda"``), a Weighting subclass, or an instance (returned as is)."""
    if isinstance(spec, Weighting):
        if options:
            raise TypeError(f"make_weighting: options {sorted(options)} given with a Weighting instance")
        return spec
    if isinstance(spec, type) and issubclass(spec, Weighting):
        return spec(**options)
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key not in _REGISTRY:
            raise ValueError(f"unknown weighting {spec!r}; choose one of {available()}")
        return _REGISTRY[key](**options)
    raise TypeError(f"make_weighting: expected a name, a Weighting subclass or instance, got {spec!r}")


class Weighting:
    """Base class: ``w = weighting(G)``.

    ``G``: a K x K Gram matrix (float tensor on any device; only its symmetric part is used).
    Returns a float64 K-vector on ``G``'s device. A non-finite ``G`` gives NaN weights, so an
    optimizer can detect the overflow and skip the step. Subclasses implement
    :meth:`weights` on the validated float64 matrix; stateful ones also ``state_dict``,
    ``load_state_dict`` and ``reset``. ``info`` holds small per-call diagnostics (device
    tensors, no host sync), replaced on every call.
    """

    name = None
    batched = False  # True: also accepts a stack (n, K, K) and returns (n, K)

    def __init__(self):
        self.info = {}

    def __call__(self, G):
        G = as_gram(G, batched=self.batched, who=type(self).__name__)
        self.info = {}
        return self.weights(G)

    def weights(self, G):
        raise NotImplementedError

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    def reset(self):
        """Forget all state (stateful methods)."""

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({opts})"

    def _options(self):
        return {}


def as_gram(G, batched=False, who="Weighting"):
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{who}: G must be a torch.Tensor, got {type(G).__name__}")
    if not G.is_floating_point() or G.is_complex():
        raise TypeError(f"{who}: G must be a real floating-point tensor, got {G.dtype}")
    if G.is_sparse:
        raise TypeError(f"{who}: G must be dense")
    ok = G.dim() == 2 or (batched and G.dim() == 3)
    if not ok or G.shape[-1] != G.shape[-2] or G.shape[-1] < 1:
        want = "(K, K) or (groups, K, K)" if batched else "(K, K)"
        raise ValueError(f"{who}: G must have shape {want} with K >= 1, got {tuple(G.shape)}")
    G = G.detach().to(torch.float64)
    return 0.5 * (G + G.transpose(-1, -2))


def can_branch(t):
    """Whether reading a value of ``t`` on the host is free (a CPU tensor). Methods branch on
    values only then; on CUDA they compute every branch and select with torch.where."""
    return t.device.type == "cpu"


def finite(G):
    """0-d bool device tensor: every entry of G is finite (no host sync)."""
    return torch.isfinite(G).all()


def nan_unless(ok, w):
    """w where ok, else NaN (ok a 0-d bool tensor; no host sync)."""
    return torch.where(ok, w, torch.full_like(w, float("nan")))


def pref(vector, k, default, device, who):
    """A preference vector as a float64 K-vector on device (``default`` fills when None)."""
    if vector is None:
        return torch.full((k,), float(default), dtype=torch.float64, device=device)
    p = torch.as_tensor(vector, dtype=torch.float64).to(device)
    if p.shape != (k,):
        raise ValueError(f"{who}: pref_vector has shape {tuple(p.shape)}, expected ({k},)")
    return p


def check_pref(vector, who):
    """Validate a user preference vector once, at construction (host values)."""
    if vector is None:
        return None
    p = torch.as_tensor(vector, dtype=torch.float64).detach().cpu()
    if p.dim() != 1 or p.numel() < 1:
        raise ValueError(f"{who}: pref_vector must be a non-empty 1-D vector, got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{who}: pref_vector entries must be finite and >= 0, got {p.tolist()}")
    return p


class Scaled(NamedTuple):
    """G = m^2 diag(sigma) C diag(sigma): the scale-free form every exact solver works on.

    sigma: gradient norms divided by the largest one (in [0, 1]); C: the cosine matrix
    (unit diagonal, off-diagonal clamped to [-1, 1]; zero rows and columns for zero
    gradients, with ``zero`` marking them). Solving in (C, sigma) makes every answer
    invariant to a global rescaling of the gradients and keeps each task's own scale in
    its own coefficient, so norms spread over many decades lose nothing to rounding."""
    C: torch.Tensor
    sigma: torch.Tensor
    zero: torch.Tensor


def scaled(G):
    d = G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    zero = d == 0
    m = d.amax(-1, keepdim=True)
    sigma = d / torch.where(m > 0, m, torch.ones_like(m))
    dd = torch.where(zero, torch.ones_like(d), d)
    C = (G / dd.unsqueeze(-1)) / dd.unsqueeze(-2)  # two divisions: no underflow of d_i d_j
    C = C.clamp(-1.0, 1.0)
    live = ~zero
    C = torch.where(live.unsqueeze(-1) & live.unsqueeze(-2), C, torch.zeros_like(C))
    eye = torch.eye(G.shape[-1], dtype=torch.bool, device=G.device)
    C = torch.where(eye & live.unsqueeze(-1), torch.ones_like(C), C)
    return Scaled(C, sigma, zero)


def with_unit_diagonal(C, zero):
    """C with 1 on the diagonal of zero-gradient rows: a stand-in unit vector orthogonal to
    every gradient. Its coefficient multiplies a zero gradient, so it cannot change the
    update; it keeps the dual-cone problems well posed."""
    eye = torch.eye(C.shape[-1], dtype=torch.bool, device=C.device)
    return torch.where(eye & zero.unsqueeze(-1), torch.ones_like(C), C)


def eig_pinv(C, rtol):
    """(C^+ with eigenvalues <= rtol * max dropped, the projector onto the kept eigenvectors).
    torch.linalg.eigh checks convergence on the host: one sync on CUDA."""
    lam, V = torch.linalg.eigh(C)
    keep = lam > rtol * lam.amax(-1, keepdim=True).clamp_min(0)
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    return (V * inv.unsqueeze(-2)) @ V.transpose(-1, -2), (V * keep.unsqueeze(-2).to(V.dtype)) @ V.transpose(-1, -2)


def default_rtol(k):
    """Relative eigenvalue cutoff of the pseudo-inverse methods: K float32 epsilons, the
    rounding of a Gram matrix computed from float32 gradients (torch.linalg.pinv's
    default for float32, and the Aligned-MTL reference's)."""
    return k * torch.finfo(torch.float32).eps
