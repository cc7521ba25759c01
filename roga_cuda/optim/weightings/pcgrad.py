"""PCGrad: project each gradient off the others it conflicts with, in a random order."""
import torch

from .base import Weighting, finite, nan_unless, register


def new_generator(seed):
    seed = torch.initial_seed() % (2 ** 63) if seed is None else int(seed)
    return torch.Generator().manual_seed(seed)


def random_orders(k, gen):
    """For each task i, the other tasks in a random order (drawn on the host generator; no
    draw for K <= 2, where the order is fixed)."""
    if k <= 2:
        return [[j for j in range(k) if j != i] for i in range(k)]
    out = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        perm = torch.randperm(len(others), generator=gen).tolist()
        out.append([others[m] for m in perm])
    return out


@register("pcgrad")
class PCGradWeighting(Weighting):
    r"""PCGrad (Yu et al., NeurIPS 2020), Algorithm 1, in Gram space.

    For each task i: ``g_i' = g_i``; for j in a random order of the other tasks, if
    ``<g_i', g_j> < 0`` then ``g_i' -= <g_i', g_j> / |g_j|^2 g_j``. The update is
    ``sum_i g_i'``. Each ``g_i'`` stays a combination ``sum_k c_k g_k`` whose inner products
    follow from G, so this is a K x K loop on the device with no host sync: the orders come
    from a host ``torch.Generator`` (saved in ``state_dict``), the projection test is a
    ``torch.where``.

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
        eye = torch.eye(k, dtype=G.dtype, device=G.device)
        diag = G.diagonal()
        safe = torch.where(diag > 0, diag, torch.ones_like(diag))
        zero = torch.zeros((), dtype=G.dtype, device=G.device)
        total = torch.zeros(k, dtype=G.dtype, device=G.device)
        for i, order in enumerate(random_orders(k, self._gen)):
            c = eye[i]
            for j in order:
                dot = c @ G[:, j]
                c = c - torch.where((dot < 0) & (diag[j] > 0), dot / safe[j], zero) * eye[j]
            total = total + c
        return nan_unless(finite(G), total)
