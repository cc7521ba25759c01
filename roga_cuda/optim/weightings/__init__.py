"""Weightings: the K x K Gram matrix of the task gradients -> K coefficients.

An aggregator in Gram space is ``gram -> weighting -> combine_``: one fused pass for
``G[i, j] = <g_i, g_j>``, a K x K computation here, one fused pass for ``sum_k w_k g_k``.
Every weighting returns *sum-form* float64 weights on G's device (K equal gradients ``g``
give ``K g`` for the averaging methods; each class documents its paper's and torchjd's
convention), and NaN weights when G is not finite.

    from roga_cuda.optim.weightings import make_weighting
    w = make_weighting("upgrad")(G)               # or UPGradWeighting(pref_vector=...)(G)

=============  =====================  ===================================================
name           class                  method
=============  =====================  ===================================================
sum            SumWeighting           plain sum
pcgrad         PCGradWeighting        Yu et al. 2020 (random projection order, seeded)
gradvac        GradVacWeighting       Wang et al. 2021 (EMA cosine targets, per group)
mgda           MGDAWeighting          min-norm point of the hull, exact
cagrad         CAGradWeighting        Liu et al. 2021, exact
upgrad         UPGradWeighting        Quinton & Rey 2024, exact dual-cone projections
dualproj       DualProjWeighting      projected sum onto the dual cone, exact
imtl_g         IMTLGWeighting         Liu et al. 2021 (equal projections)
aligned_mtl    AlignedMTLWeighting    Senushkin et al. 2023 (eigen-alignment)
nash_mtl       NashMTLWeighting       Navon et al. 2022 (bargaining, Newton)
random / rlw   RandomWeighting        Lin et al. 2022 (random loss weighting)
config         ConFIGWeighting        Liu et al. 2024 (conflict-free, equal cosines)
=============  =====================  ===================================================

Your own: subclass :class:`Weighting`, implement ``weights(G)`` (G: validated float64
K x K), and optionally ``state_dict``/``load_state_dict``/``reset``; decorate with
``@register("name")`` to make the name usable wherever a method string is accepted.
"""
from .aligned_mtl import AlignedMTLWeighting
from .base import Weighting, available, make_weighting, register
from .cagrad import CAGradWeighting
from .config import ConFIGWeighting
from .dualproj import DualProjWeighting
from .gradvac import GradVacWeighting, gradvac_groups
from .imtl_g import IMTLGWeighting
from .mgda import MGDAWeighting
from .nash_mtl import NashMTLWeighting
from .pcgrad import PCGradWeighting
from .random import RandomWeighting
from .sum import SumWeighting
from .upgrad import UPGradWeighting

__all__ = ["Weighting", "available", "make_weighting", "register", "gradvac_groups",
           "SumWeighting", "PCGradWeighting", "GradVacWeighting", "MGDAWeighting", "CAGradWeighting",
           "UPGradWeighting", "DualProjWeighting", "IMTLGWeighting", "AlignedMTLWeighting",
           "NashMTLWeighting", "RandomWeighting", "ConFIGWeighting"]
