"""PCGrad: project each gradient off the others it conflicts with, in a random order."""
import math

import torch

from . import base
from .base import Weighting, finite, nan_unless, register


def new_generator(seed):
    seed = torch.initial_seed() % (2 ** 63) if seed is None else int(seed)
    return torch.Generator().manual_seed(seed)


def draw_orders(k, gen):
    """Per task i, the other tasks in a random order (drawn on the host generator, one
    permutation per task; no draw for K <= 2, where the order is fixed)."""
    out = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        if k > 2:
            others = [others[m] for m in torch.randperm(k - 1, generator=gen).tolist()]
        out.append(others)
    return out


def random_orders(k, gen, device):
    """draw_orders as a (K, K-1) long tensor, reaching the device with a non-blocking copy."""
    out = draw_orders(k, gen)
    return torch.tensor(out, dtype=torch.long).reshape(k, k - 1).to(device, non_blocking=True)


@register("pcgrad")
class PCGradWeighting(Weighting):
    r"""PCGrad (Yu et al., NeurIPS 2020), Algorithm 1, in Gram space.

    For each task i: ``g_i' = g_i``; for j in a random order of the other tasks, if
    ``<g_i', g_j> < 0`` then ``g_i' -= <g_i', g_j> / |g_j|^2 g_j``. The update is
    ``sum_i g_i'``. Each ``g_i'`` stays a combination ``sum_k c_k g_k`` whose inner products
    follow from G, so this is K - 1 vectorised steps (all tasks at once) on the device with
    no host sync: the orders come from a host ``torch.Generator`` (saved in
    ``state_dict``), the projection test is a ``torch.where``. On a CPU G the same steps run
    in Python floats (K = 2: 200 -> 62 us a call), as the other methods branch on CPU values.

    Convention: sum form, as the paper (torchjd's ``PCGradWeighting`` also sums; it draws a
    permutation of all K tasks from the global RNG, so only K = 2 matches draw for draw).
    A zero ``g_j`` is never projected on (``<g_i', g_j> = 0``); there is no epsilon.

    Args:
        seed: seeds the order generator (default: from torch's initial seed).
    """

    def __init__(self, seed=None):
        super().__init__()
        self._gen = new_generator(seed)

    def state_dict(self):
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state):
        if state.get("generator") is not None:
            self._gen.set_state(state["generator"])

    def weights(self, G):
        k = G.shape[0]
        if base.can_branch(G):  # a CPU G: the same steps in host floats, not ~10 tensor ops per step
            return _host_weights(G.tolist(), draw_orders(k, self._gen))
        order = random_orders(k, self._gen, G.device)
        diag = G.diagonal()
        pos = diag > 0
        safe = torch.where(pos, diag, torch.ones_like(diag))
        rows = torch.arange(k, device=G.device)
        c = torch.eye(k, dtype=G.dtype, device=G.device)   # row i: coefficients of g_i'
        zero = torch.zeros((), dtype=G.dtype, device=G.device)
        for s in range(k - 1):                               # all tasks i at once: step s of each order
            j = order[:, s]
            dot = (c * G[j]).sum(1)                          # <g_i', g_j> (G symmetric)
            c[rows, j] -= torch.where((dot < 0) & pos[j], dot / safe[j], zero)
        return nan_unless(finite(G), c.sum(0))


def _host_weights(g, orders):
    """The device path's steps, task by task (each row of c changes only by its own steps),
    in Python floats (float64)."""
    k = len(g)
    if not all(map(math.isfinite, (x for row in g for x in row))):
        return torch.full((k,), float("nan"), dtype=torch.float64)
    c = [[float(a == b) for b in range(k)] for a in range(k)]
    for ci, order in zip(c, orders):
        for j in order:
            gj = g[j]
            dot = ci[0] * gj[0]
            for m in range(1, k):
                dot += ci[m] * gj[m]
            if dot < 0 and gj[j] > 0:
                ci[j] -= dot / gj[j]
    return torch.tensor([sum(col[1:], col[0]) for col in zip(*c)], dtype=torch.float64)
