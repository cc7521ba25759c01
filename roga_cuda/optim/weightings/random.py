"""Random loss weighting (RLW): fresh random weights every step."""
import torch

from .base import Weighting, finite, nan_unless, register
from .pcgrad import new_generator

DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli")


@register("random", "rlw")
class RandomWeighting(Weighting):
    r"""Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random Weighting: A
    Litmus Test for Multi-Task Learning", TMLR 2022).

    Each call draws ``lambda`` on the simplex: ``"normal"`` softmax of N(0, 1) draws (the
    paper's main choice, LibMTL's and torchjd's ``Random``), ``"uniform"`` softmax of
    U(0, 1) draws, ``"dirichlet"`` Dir(1, ..., 1) (normalised exponentials),
    ``"bernoulli"`` Bernoulli(1/2) per task, normalised (an empty draw is drawn again: every
    non-empty subset equally likely), ``"constrained_bernoulli"`` one task drawn uniformly,
    weight 1 (one task per step). The draws come from a host ``torch.Generator`` (float64; saved in
    ``state_dict``) and reach the device with a non-blocking copy: no host sync.

    Convention: returns ``K lambda`` (sum form); LibMTL and torchjd use ``lambda`` (ours / K;
    torchjd draws from the global RNG in G's dtype, so a float64 G and the same seed give the
    same draws).

    Args:
        distribution: one of "normal", "uniform", "dirichlet", "bernoulli",
            "constrained_bernoulli".
        seed: seeds the generator.
    """

    def __init__(self, distribution="normal", seed=None):
        super().__init__()
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"RandomWeighting: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = distribution
        self._gen = new_generator(seed)

    def _options(self):
        return {"distribution": self.distribution}

    def state_dict(self):
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state):
        if state.get("generator") is not None:
            self._gen.set_state(state["generator"])

    def draw(self, k):
        """K simplex weights on the host (one call's draw)."""
        g = self._gen
        if self.distribution == "normal":
            return torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), 0)
        if self.distribution == "uniform":
            return torch.softmax(torch.rand(k, generator=g, dtype=torch.float64), 0)
        if self.distribution == "dirichlet":
            e = -torch.log1p(-torch.rand(k, generator=g, dtype=torch.float64))  # Exp(1), never log(0)
            return e / e.sum()
        if self.distribution == "constrained_bernoulli":
            return torch.zeros(k, dtype=torch.float64).index_fill_(0, torch.randint(k, (1,), generator=g), 1.0)
        while True:  # (host tensors: no device sync; an empty draw has probability 2^-K)
            b = torch.rand(k, generator=g, dtype=torch.float64) < 0.5
            if bool(b.any()):
                return b.double() / b.sum()

    def weights(self, G):
        k = G.shape[0]
        lam = self.draw(k).to(G.device, non_blocking=True)
        return nan_unless(finite(G), k * lam)
