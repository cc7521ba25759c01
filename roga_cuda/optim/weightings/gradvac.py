"""GradVac: raise each pairwise cosine to an EMA target, optionally per parameter group."""
import torch

from .base import Weighting, register
from .pcgrad import new_generator, random_orders

UPDATES = ("always", "violated")


@register("gradvac")
class GradVacWeighting(Weighting):
    r"""Gradient Vaccine (Wang et al., ICLR 2021), Algorithm 1, in Gram space.

    For each task i, ``g_i' = g_i``; for j in a random order of the other tasks, with
    ``phi = cos(g_i', g_j)`` and the target ``phi_hat_ij``: if ``phi < phi_hat``,

    .. math:: g_i' \mathrel{+}= \frac{|g_i'| (\hat\phi \sqrt{1-\phi^2} - \phi \sqrt{1-\hat\phi^2})}
                                      {|g_j| \sqrt{1-\hat\phi^2}}\, g_j

    (which makes ``cos(g_i', g_j) = phi_hat``), and ``phi_hat <- (1 - beta) phi_hat + beta phi``.
    The update is ``sum_i g_i'`` (sum form, as the paper, LibMTL and torchjd).

    Groups: G may be a stack ``(n_groups, K, K)`` of per-group Gram matrices (LibMTL's
    ``GradVac_group_type``: one group per layer or per parameter tensor); each group has its
    own targets and gets its own weights ``(n_groups, K)``, with the task order shared by
    the groups within a call, as in LibMTL. :func:`gradvac_groups` builds LibMTL's groups.

    Exact at every scale: the cosine is computed on G divided by its mean diagonal, as
    ``<g_i', g_j> / (|g_i'| |g_j|)`` with no epsilon; a pair where either vector is zero has
    no cosine and is skipped (no correction, target unchanged), as is a target of exactly
    +-1 (no finite correction reaches it). K - 1 vectorised device steps (all tasks and
    groups at once) with a host order generator: no host sync. A group whose G is not finite gets NaN weights and keeps its targets.

    Args:
        beta: EMA rate of the targets in (0, 1] (the paper: 0.01; LibMTL's default: 0.5).
        update: "always" (the paper, torchjd: the target moves every time) or "violated"
            (LibMTL: only when the correction was applied).
        seed: seeds the order generator.
    """

    batched = True

    def __init__(self, beta=0.01, update="always", seed=None):
        super().__init__()
        if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
            raise ValueError(f"GradVacWeighting: beta must be in (0, 1], got {beta!r}")
        if update not in UPDATES:
            raise ValueError(f"GradVacWeighting: update must be one of {UPDATES}, got {update!r}")
        self.beta, self.update = float(beta), update
        self._gen = new_generator(seed)
        self.targets = None

    def _options(self):
        return {"beta": self.beta, "update": self.update}

    def reset(self):
        self.targets = None

    def state_dict(self):
        return {"targets": None if self.targets is None else self.targets.detach().cpu(),
                "generator": self._gen.get_state()}

    def load_state_dict(self, state):
        self.targets = state.get("targets")
        if state.get("generator") is not None:
            self._gen.set_state(state["generator"])

    def weights(self, G):
        single = G.dim() == 2
        Gs = G.unsqueeze(0) if single else G
        n, k = Gs.shape[0], Gs.shape[-1]
        if self.targets is None:
            self.targets = torch.zeros(n, k, k, dtype=torch.float64, device=G.device)
        elif tuple(self.targets.shape) != (n, k, k):
            raise ValueError(f"GradVacWeighting: got {n} group(s) of {k} tasks, but the targets are for "
                             f"{self.targets.shape[0]} group(s) of {self.targets.shape[-1]}")
        T = self.targets.to(G.device, torch.float64).clone()
        ok = torch.isfinite(Gs).flatten(1).all(1)                        # (n,)
        scale = Gs.diagonal(dim1=1, dim2=2).mean(1)
        scale = torch.where(ok & (scale > 0), scale, torch.ones_like(scale))
        Gn = torch.where(ok[:, None, None], Gs / scale[:, None, None], torch.zeros_like(Gs))
        order = random_orders(k, self._gen, G.device)
        rows = torch.arange(k, device=G.device)
        zero = torch.zeros((), dtype=torch.float64, device=G.device)
        one = torch.ones((), dtype=torch.float64, device=G.device)
        nrm = Gn.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()             # |g_j|, (n, k)
        c = torch.eye(k, dtype=torch.float64, device=G.device).repeat(n, 1, 1)  # [g, i]: coefficients of g_i'
        cG = Gn.clone()                                                   # [g, i]: c_i' G
        gi2 = Gn.diagonal(dim1=1, dim2=2).clone()                          # |g_i'|^2
        for s in range(k - 1):                                            # all tasks i at once
            j = order[:, s]
            dot = cG[:, rows, j]
            ni, nj = gi2.clamp_min(0).sqrt(), nrm[:, j]
            valid = (ni > 0) & (nj > 0)
            phi = torch.where(valid, dot / torch.where(valid, ni * nj, one), zero).clamp(-1, 1)
            t = T[:, rows, j]
            st = (1 - t * t).clamp_min(0).sqrt()
            apply = valid & (phi < t) & (st > 0)
            w = ni * (t * (1 - phi * phi).clamp_min(0).sqrt() - phi * st) / (nj * torch.where(st > 0, st, one))
            w = torch.where(apply, w, zero)
            c[:, rows, j] += w
            cG += w.unsqueeze(-1) * Gn[:, j, :]
            gi2 = (cG * c).sum(-1)
            moved = apply if self.update == "violated" else valid
            T[:, rows, j] = torch.where(moved, t + self.beta * (phi - t), t)
        targets, total = T, c.sum(1)
        self.targets = targets
        self.info = {"targets": targets}
        w = torch.where(ok.unsqueeze(1), total, torch.full_like(total, float("nan")))
        return w[0] if single else w


def gradvac_groups(module, kind="layer"):
    """Parameter groups of ``module`` for per-group GradVac, as LibMTL's group types:
    ``"model"`` (0: one group), ``"layer"`` (1: each leaf module that owns parameters),
    ``"matrix"`` (2: each parameter tensor). Returns a list of lists of parameters
    (parameters not requiring grad are left out; with ``"layer"``, parameters owned by
    non-leaf modules form one last group, where LibMTL would leave them unaligned)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if kind == "model":
        return [params]
    if kind == "matrix":
        return [[p] for p in params]
    if kind == "layer":
        groups = []
        for m in module.modules():
            if len(m._modules) == 0:
                own = [p for p in m.parameters(recurse=False) if p.requires_grad]
                if own:
                    groups.append(own)
        seen = {id(p) for g in groups for p in g}
        rest = [p for p in params if id(p) not in seen]  # owned by non-leaf modules: LibMTL leaves them out
        return groups + ([rest] if rest else [])
    raise ValueError(f"gradvac_groups: kind must be 'model', 'layer' or 'matrix', got {kind!r}")
