"""Countermeasure models: AASIST (exact, and an earlier variant) and RawNet2, with an optional SSL front end.

* :class:`AASIST` (Jung et al., ICASSP 2022) exactly as clovaai/aasist implements it:
  ``build_model("aasist")`` is their ``AASIST.conf`` (297,866 parameters),
  ``build_model("aasist_l")`` their ``AASIST-L.conf`` (85,306); their released weights load
  with :func:`load_clovaai_state_dict`. A fixed mel sinc filterbank on the raw waveform, a
  2-D residual encoder, spectral and temporal graph attention with graph pooling, two
  heterogeneous stacking graph attention branches with master nodes, and a max/mean readout.
* :class:`AASISTSSLReadout` (``"aasist_ssl_readout"``): this project's earlier ``aasist``, the
  same layers read out SSL-AASIST style (softmax-attention sums); see its docstring for every
  difference. Widths are configurable for both, so the same code runs the full model on a
  GPU and a small one on a laptop CPU. With ``ssl_checkpoint`` either one takes a
  self-supervised model's features instead of the sinc filterbank (as SSL-AASIST).
* :class:`RawNet2` (Tak et al. 2021): sinc filters, 1-D residual blocks with filter-wise
  feature-map scaling, a GRU and a linear head.

All return logits (B, 2): index 1 = bona fide (the score), index 0 = spoof.
"""
import functools
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------- sinc front end

def _to_mel(hz):
    return 2595 * np.log10(1 + hz / 700)


def _to_hz(mel):
    return 700 * (10 ** (mel / 2595) - 1)


class SincConv(nn.Module):
    """Band-pass filterbank ``h_i = 2 f2 sinc(2 f2 n / fs) - 2 f1 sinc(2 f1 n / fs)`` with
    mel-spaced band edges, Hamming window. Fixed (a buffer) unless ``learnable``, in which
    case the band edges are parameters (SincNet)."""

    def __init__(self, out_channels, kernel_size, fs=16000, stride=1, learnable=False, min_hz=0.0):
        super().__init__()
        if kernel_size % 2 == 0:
            kernel_size += 1  # symmetric, odd length
        self.kernel_size, self.stride, self.fs = kernel_size, stride, fs
        mel = np.linspace(_to_mel(min_hz), _to_mel(fs / 2), out_channels + 1)
        edges = torch.tensor(_to_hz(mel), dtype=torch.float32)
        low, high = edges[:-1], edges[1:]
        n = torch.arange(-(kernel_size // 2), kernel_size // 2 + 1, dtype=torch.float32)
        self.register_buffer("n", n, persistent=False)
        self.register_buffer("window", torch.hamming_window(kernel_size, periodic=False), persistent=False)
        if learnable:
            self.low = nn.Parameter(low)
            self.band = nn.Parameter(high - low)
        else:
            self.register_buffer("low", low)
            self.register_buffer("band", high - low)

    def filters(self):
        f1 = self.low.abs()
        f2 = (f1 + self.band.abs()).clamp(max=self.fs / 2)
        n = self.n[None, :]
        h = (2 * f2[:, None] * torch.sinc(2 * f2[:, None] * n / self.fs)
             - 2 * f1[:, None] * torch.sinc(2 * f1[:, None] * n / self.fs)) / self.fs
        return (h * self.window)[:, None, :]

    def forward(self, x):  # (B, T) -> (B, C, T')
        return F.conv1d(x[:, None, :], self.filters().to(x.dtype), stride=self.stride,
                        padding=self.kernel_size // 2)


# ----------------------------------------------------------------------- SSL front end

class SSLFrontEnd(nn.Module):
    """Features of a self-supervised speech model loaded from a LOCAL checkpoint only.

    Accepted: a Hugging Face ``transformers`` model folder (config.json + weights; needs
    ``transformers``), a fairseq ``.pt`` checkpoint (needs ``fairseq``), a ``torch.export``
    program (``.pt2``) or a TorchScript archive, the last two mapping (B, T) waveforms to
    (B, frames, dim) features.
    Nothing is downloaded. ``freeze``: keep the SSL weights fixed."""

    def __init__(self, path, freeze=False):
        super().__init__()
        if not path:
            raise ValueError("SSL front end: give a local checkpoint path (model.ssl_checkpoint=...); "
                             "nothing is downloaded")
        path = os.path.expanduser(os.fspath(path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"SSL front end: checkpoint not found: {path} (nothing is downloaded; "
                                    "point model.ssl_checkpoint at a local transformers folder, fairseq .pt or "
                                    "TorchScript file)")
        self.kind, self.model = self._load(path)
        self.freeze = bool(freeze)
        if self.freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.dim = None

    @staticmethod
    def _load(path):
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"SSL front end: folder {path} has no config.json (expected a transformers model folder)")
            try:
                from transformers import AutoModel
            except ImportError:
                raise ImportError(f"SSL front end: {path} is a transformers model folder, but `transformers` is not "
                                  "installed (pip install transformers)") from None
            return "hf", AutoModel.from_pretrained(path, local_files_only=True)
        if path.endswith(".pt2"):  # torch.export.save(...) of a (B, T) -> (B, frames, dim) module
            return "export", torch.export.load(path).module()
        try:
            return "jit", torch.jit.load(path, map_location="cpu")
        except Exception as jit_err:
            try:
                import fairseq  # noqa: F401
            except ImportError:
                raise ValueError(f"SSL front end: {path} is not a TorchScript archive ({type(jit_err).__name__}), "
                                 "and fairseq (needed for fairseq .pt checkpoints) is not installed") from None
            from fairseq import checkpoint_utils
            models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path])
            return "fairseq", models[0]

    def forward(self, x):  # (B, T) -> (B, frames, dim)
        ctx = torch.no_grad() if self.freeze else torch.enable_grad()
        with ctx:
            if self.kind == "hf":
                out = self.model(x).last_hidden_state
            elif self.kind == "fairseq":
                out = self.model(x, mask=False, features_only=True)["x"]
            else:
                out = self.model(x)
        if out.dim() != 3:
            raise ValueError(f"SSL front end: expected (batch, frames, dim) features, got shape {tuple(out.shape)}")
        return out


# --------------------------------------------------------------------------- AASIST parts

class MelSincBank(nn.Module):
    """AASIST's first layer: a fixed bank of Hamming-windowed band-pass sinc filters whose
    edges are equally spaced on the mel scale from 0 Hz to fs/2, applied WITHOUT padding
    (T samples -> T - K + 1 frames; K = kernel_size made odd: 64600 -> 64472 for K = 129).

    The bank is computed once in float64 and kept as a non-persistent buffer: like the
    original's, it is a constant of the configuration, not part of the state dict; it is
    cast to the input's dtype at use."""

    def __init__(self, out_channels, kernel_size, fs=16000, stride=1):
        super().__init__()
        k = kernel_size | 1                                                    # odd: symmetric filters
        self.kernel_size, self.stride = k, stride
        edges = _to_hz(np.linspace(0.0, _to_mel(fs // 2), out_channels + 1))  # float64
        n = np.arange(k) - (k - 1) / 2
        lo, hi = edges[:-1, None], edges[1:, None]
        bank = (2 * hi / fs) * np.sinc(2 * hi * n / fs) - (2 * lo / fs) * np.sinc(2 * lo * n / fs)
        bank = bank * np.hamming(k)
        self.register_buffer("bank", torch.from_numpy(bank)[:, None, :], persistent=False)  # (C, 1, K)

    def forward(self, x):  # (B, T) -> (B, C, T - K + 1)
        return F.conv1d(x[:, None, :], self.bank.to(x.dtype), stride=self.stride)


class Res2d(nn.Module):
    """AASIST encoder block: [BN-SELU] conv(2,3) BN SELU conv(2,3) + skip, max-pool (1, pool).

    ``preact=False`` is clovaai/aasist's behaviour: its block computes SELU(bn1(x)) and then
    feeds ``x``, not that, to conv1, so the pre-activation is dead code. It stays dead here:
    ``bn1`` exists (its parameters count and load from the original's state dict) but is not
    applied; the original's one side effect, updating bn1's running statistics during
    training, reaches no output. ``preact=True`` applies it (this project's earlier variant).
    ``pool`` = 1: no pooling (SSL-AASIST's encoder, whose SSL frames are already coarse)."""

    def __init__(self, cin, cout, first=False, pool=3, preact=True):
        super().__init__()
        self.first, self.preact = first, preact
        if not first:
            self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, (2, 3), padding=(1, 1))
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, (2, 3), padding=(0, 1))
        self.down = nn.Conv2d(cin, cout, (1, 3), padding=(0, 1)) if cin != cout else None
        self.pool = nn.MaxPool2d((1, pool)) if pool > 1 else nn.Identity()

    def forward(self, x):
        out = F.selu(self.bn1(x)) if self.preact and not self.first else x
        out = self.conv2(F.selu(self.bn2(self.conv1(out))))
        skip = self.down(x) if self.down is not None else x
        return self.pool(out + skip)


def _attention_weights(shape, xavier):
    """Attention weight vectors of shape (..., dout, 1): Xavier-normal as clovaai/aasist (each
    (dout, 1) vector: std sqrt(2 / (dout + 1))), else N(0, 1/dout) as this project's earlier
    variant (whose random stream this keeps)."""
    w = torch.randn(*shape) / math.sqrt(shape[-2])
    if xavier:
        for v in w.view(-1, *shape[-2:]):
            nn.init.xavier_normal_(v)
    return w


def _node_bn(bn, y, exact):
    """BatchNorm of (B, N, D) node features over batch and nodes. ``exact``: on the flattened
    (B N, D) rows as clovaai/aasist, whose memory layout (contiguous) fixes the Dropout masks
    drawn from the result; else through a transpose (this project's earlier variant)."""
    if exact:
        return bn(y.reshape(-1, y.shape[-1])).view(y.shape)
    return bn(y.transpose(1, 2)).transpose(1, 2)


class GAT(nn.Module):
    """Graph attention layer over fully connected nodes (AASIST's): attention from the
    element-wise product of node pairs, temperature-scaled softmax over the neighbours,
    with- and without-attention projections summed, BatchNorm over batch and nodes, SELU.
    ``exact``: clovaai/aasist's initialisation and memory layout (see :func:`_node_bn`)."""

    def __init__(self, din, dout, temperature=1.0, dropout=0.2, exact=False):
        super().__init__()
        self.exact = exact
        self.att_proj = nn.Linear(din, dout)
        self.att_w = nn.Parameter(_attention_weights((dout, 1), exact))
        self.proj_att = nn.Linear(din, dout)
        self.proj = nn.Linear(din, dout)
        self.bn = nn.BatchNorm1d(dout)
        self.drop = nn.Dropout(dropout)
        self.temp = temperature

    def forward(self, x):  # (B, N, D)
        x = self.drop(x)
        pair = x[:, :, None, :] * x[:, None, :, :]                                  # (B, N, N, D)
        att = torch.tanh(self.att_proj(pair)) @ self.att_w                         # (B, N, N, 1)
        att = F.softmax(att.squeeze(-1) / self.temp, dim=-1)
        y = self.proj_att(att @ x) + self.proj(x)
        return F.selu(_node_bn(self.bn, y, self.exact))


class GraphPool(nn.Module):
    """Keep the top ``ratio`` of the nodes by a learned sigmoid score (scores gate the nodes)."""

    def __init__(self, dim, ratio, dropout=0.3):
        super().__init__()
        self.score = nn.Linear(dim, 1)
        self.ratio = ratio
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        s = torch.sigmoid(self.score(self.drop(x)))                                 # (B, N, 1)
        k = max(1, int(x.shape[1] * self.ratio))
        idx = s.squeeze(-1).topk(k, dim=1).indices
        idx = idx[:, :, None].expand(-1, -1, x.shape[2])
        return torch.gather(x * s, 1, idx)


class HSGAL(nn.Module):
    """Heterogeneous stacking graph attention layer: temporal and spectral nodes in one
    graph with type-specific pair attention (T-T, S-S, T-S) plus a master node that attends
    to all nodes. ``exact`` as for :class:`GAT`."""

    def __init__(self, din, dout, temperature=1.0, dropout=0.2, exact=False):
        super().__init__()
        self.exact = exact
        self.in_t, self.in_s = nn.Linear(din, din), nn.Linear(din, din)
        self.att_proj = nn.Linear(din, dout)
        self.att_w = nn.Parameter(_attention_weights((3, dout, 1), exact))      # T-T, S-S, T-S
        self.att_proj_m = nn.Linear(din, dout)
        self.att_w_m = nn.Parameter(_attention_weights((dout, 1), exact))
        self.proj_att, self.proj = nn.Linear(din, dout), nn.Linear(din, dout)
        self.proj_att_m, self.proj_m = nn.Linear(din, dout), nn.Linear(din, dout)
        self.bn = nn.BatchNorm1d(dout)
        self.drop = nn.Dropout(dropout)
        self.temp = temperature

    def forward(self, xt, xs, master):
        nt = xt.shape[1]
        x = self.drop(torch.cat([self.in_t(xt), self.in_s(xs)], dim=1))             # (B, N, D)
        n = x.shape[1]
        pair = torch.tanh(self.att_proj(x[:, :, None, :] * x[:, None, :, :]))      # (B, N, N, dout)
        a = torch.stack([(pair @ self.att_w[k]).squeeze(-1) for k in range(3)])     # (3, B, N, N)
        is_t = torch.arange(n, device=x.device) < nt
        tt = is_t[:, None] & is_t[None, :]
        ss = ~is_t[:, None] & ~is_t[None, :]
        att = torch.where(tt, a[0], torch.where(ss, a[1], a[2]))
        att = F.softmax(att / self.temp, dim=-1)
        # master node: attention over all nodes, then its own projections
        am = torch.tanh(self.att_proj_m(x * master)) @ self.att_w_m                 # (B, N, 1)
        am = F.softmax(am / self.temp, dim=1)
        master = self.proj_att_m((am * x).sum(1, keepdim=True)) + self.proj_m(master)
        y = self.proj_att(att @ x) + self.proj(x)
        y = F.selu(_node_bn(self.bn, y, self.exact))
        return y[:, :nt], y[:, nt:], master


class Branch(nn.Module):
    """One AASIST inference branch: HS-GAL, graph pooling of both node types, a second
    HS-GAL, its outputs added to its inputs (both pools use the same ratio, as the original)."""

    def __init__(self, din, dout, temperature, ratio):
        super().__init__()
        self.hs1 = HSGAL(din, dout, temperature, exact=True)
        self.hs2 = HSGAL(dout, dout, temperature, exact=True)
        self.pool_s = GraphPool(dout, ratio)
        self.pool_t = GraphPool(dout, ratio)

    def forward(self, t, s, master):
        t1, s1, m1 = self.hs1(t, s, master)
        s1 = self.pool_s(s1)             # spectral first: the original's order (dropout draws)
        t1 = self.pool_t(t1)
        t2, s2, m2 = self.hs2(t1, s1, m1)
        return t1 + t2, s1 + s2, m1 + m2


def _block_pool(block_pool, ssl):
    """The encoder's per-block time pooling: AASIST's 3 on sinc frames; none on SSL frames
    (SSL-AASIST: 4 s gives ~200 frames, six /3 poolings would leave none)."""
    if block_pool is None:
        return 1 if ssl else 3
    if int(block_pool) < 1:
        raise ValueError(f"block_pool must be >= 1 (1: no pooling), got {block_pool}")
    return int(block_pool)


class _AASISTFront(nn.Module):
    """Shared front of both AASIST variants: sinc magnitudes (or projected SSL features)
    as a (B, 1, F, T) image, 3x3 max-pooled, BatchNorm, SELU; then the residual encoder."""

    def _build_front(self, sinc, sinc_channels, ssl_checkpoint, ssl_freeze, ssl_dim, filts, front_log, pool, preact):
        self.front_log = bool(front_log)
        self.ssl = SSLFrontEnd(ssl_checkpoint, ssl_freeze) if ssl_checkpoint else None
        if self.ssl is None:
            self.sinc = sinc
        else:
            self.ssl_proj = nn.LazyLinear(ssl_dim)  # the SSL feature size is known only after loading
        self.bn0 = nn.BatchNorm2d(1)
        if not filts:
            raise ValueError("AASIST: filts must list at least one encoder width")
        blocks, cin = [], 1
        for i, c in enumerate(filts):
            blocks.append(Res2d(cin, c, first=(i == 0), pool=_block_pool(pool, self.ssl is not None), preact=preact))
            cin = c
        self.encoder = nn.Sequential(*blocks)
        self.n_spectral = (ssl_dim if self.ssl is not None else sinc_channels) // 3  # rows after the 3x3 pool

    def front(self, x):
        if x.dim() != 2:
            raise ValueError(f"AASIST: expected waveforms of shape (batch, samples), got {tuple(x.shape)}")
        if self.ssl is None:
            z = self.sinc(x).abs()[:, None]                                         # (B, 1, F, T)
        else:
            z = self.ssl_proj(self.ssl(x)).transpose(1, 2)[:, None]                 # (B, 1, dim, frames)
        z = F.max_pool2d(z, 3)
        if self.front_log and self.ssl is None:
            # log compression: with one BatchNorm over all bands, linear magnitudes leave the weak
            # high bands nearly invisible; small models trained briefly need them (not in the paper)
            z = torch.log(z + 1e-4)
        return F.selu(self.bn0(z))

    def encode(self, x):
        z = self.front(x)
        if z.shape[-1] < 1 or z.shape[-2] < 1:
            raise ValueError(f"AASIST: {x.shape[-1]} samples give no frames after the front end's 3x3 pooling")
        for i, block in enumerate(self.encoder):
            pool = block.pool.kernel_size[1] if isinstance(block.pool, nn.MaxPool2d) else 1
            if z.shape[-1] < pool:
                raise ValueError(f"AASIST: encoder block {i + 1} of {len(self.encoder)} gets {z.shape[-1]} frame(s) "
                                 f"of {x.shape[-1]} samples and would pool them by {pool} to no frames: use longer "
                                 "clips, fewer blocks (filts) or block_pool=1")
            z = block(z)
        return z                                                                    # (B, C, F', T')


class AASIST(_AASISTFront):
    """AASIST (Jung et al., ICASSP 2022) as clovaai/aasist implements it. At the defaults it is
    their ``AASIST.conf`` (297,866 parameters); ``aasist_l`` in :func:`build_model` is
    ``AASIST-L.conf`` (85,306). State dicts of the original load with
    :func:`load_clovaai_state_dict`.

    Forward: fixed mel sinc bank without padding -> |.| -> 3x3 max-pool -> BN -> SELU ->
    residual encoder (pre-activations dead, see :class:`Res2d`) -> spectral nodes = max of |.|
    over time plus a learned positional embedding, temporal nodes = max of |.| over frequency
    -> a GAT and a graph pool each -> ``branches`` HS-GAL branches with their master nodes ->
    Dropout(``drop_way``) on every branch output -> element-wise max over branches -> readout
    [max |T|, mean T, max |S|, mean S, master] -> Dropout(``dropout``) -> linear.
    Attention vectors are Xavier-normal initialised, as in the original.

    Extensions (the defaults are the original): ``branches`` (the original has 2), the widths,
    ``front_log`` (log-compress the sinc magnitudes; the small presets need it), an SSL front
    end instead of the sinc bank (``ssl_checkpoint``: its features projected to ``ssl_dim``
    rows, as SSL-AASIST), ``block_pool`` (the encoder's time pooling: default 3 with the sinc
    bank, 1 with an SSL front end). ``temperatures[3]`` and ``pool_ratios[3]`` are unused, as
    in the original (all four HS-GALs use ``temperatures[2]``, all four branch pools
    ``pool_ratios[2]``)."""

    def __init__(self, sinc_channels=70, sinc_kernel=128, filts=(32, 32, 64, 64, 64, 64), gat_dims=(64, 32),
                 pool_ratios=(0.5, 0.7, 0.5, 0.5), temperatures=(2.0, 2.0, 100.0, 100.0), fs=16000,
                 sinc_stride=1, ssl_checkpoint=None, ssl_freeze=False, ssl_dim=128, dropout=0.5, drop_way=0.2,
                 branches=2, front_log=False, block_pool=None):
        super().__init__()
        sinc = None if ssl_checkpoint else MelSincBank(sinc_channels, sinc_kernel, fs, stride=sinc_stride)
        self._build_front(sinc, sinc_channels, ssl_checkpoint, ssl_freeze, ssl_dim, filts, front_log, block_pool,
                          preact=False)
        c = filts[-1]
        if self.n_spectral < 1:
            raise ValueError("AASIST: need at least 3 sinc channels (or ssl_dim >= 3): the 3x3 pooling leaves none")
        self.pos_s = nn.Parameter(torch.randn(1, self.n_spectral, c))
        self.gat_s = GAT(c, gat_dims[0], temperatures[0], exact=True)
        self.gat_t = GAT(c, gat_dims[0], temperatures[1], exact=True)
        self.pool_s = GraphPool(gat_dims[0], pool_ratios[0])
        self.pool_t = GraphPool(gat_dims[0], pool_ratios[1])
        self.masters = nn.ParameterList([nn.Parameter(torch.randn(1, 1, gat_dims[0])) for _ in range(branches)])
        self.branches = nn.ModuleList([Branch(gat_dims[0], gat_dims[1], temperatures[2], pool_ratios[2])
                                       for _ in range(branches)])
        self.drop_way = nn.Dropout(drop_way)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(5 * gat_dims[1], 2)

    def forward(self, x):
        # max via torch.max(dim) as the original: on ties its gradient goes to one element
        z = self.encode(x).abs()                                                    # (B, C, F', T')
        s_nodes = z.max(-1).values.transpose(1, 2)                                  # (B, F', C): max over time
        if s_nodes.shape[1] != self.pos_s.shape[1]:
            raise ValueError(f"AASIST: {s_nodes.shape[1]} spectral nodes, positional embedding for "
                             f"{self.pos_s.shape[1]}")
        s = self.pool_s(self.gat_s(s_nodes + self.pos_s))
        t = self.pool_t(self.gat_t(z.max(-2).values.transpose(1, 2)))              # (B, T', C): max over frequency
        outs = [br(t, s, m.expand(x.shape[0], -1, -1)) for br, m in zip(self.branches, self.masters)]
        # drop_way on every branch output, in the original's order (all T, all S, all masters)
        tt, ss, mm = ([self.drop_way(o[k]) for o in outs] for k in range(3))
        tt, ss, mm = (functools.reduce(torch.maximum, v) for v in (tt, ss, mm))
        feat = torch.cat([tt.abs().max(1).values, tt.mean(1), ss.abs().max(1).values, ss.mean(1), mm.squeeze(1)], 1)
        return self.head(self.drop(feat))


class AASISTSSLReadout(_AASISTFront):
    """This project's earlier ``aasist``: AASIST's sinc front end, encoder and graph layers
    read out SSL-AASIST style (Tak et al., Odyssey 2022, the back end of the XLSR-AASIST
    the DPDA paper trains): a 1x1-conv attention map whose softmaxes over time and over
    frequency weight the sums that form the spectral and temporal nodes.

    Differs from clovaai/aasist (:class:`AASIST`) in: the attention readout instead of max |.|
    (+ the attention convs), no positional embedding on the spectral nodes, live
    pre-activations in the encoder, no Dropout on the branch outputs, a "same"-padded sinc
    filter (T frames for T samples), the second branch pool using ``pool_ratios[3]``,
    N(0, 1/d) attention initialisation. Differs from SSL-AASIST in: its attention map is
    conv-BN-SELU-conv (SSL-AASIST: conv-SELU-BN-conv), no BN-SELU after the encoder, no
    positional embedding, and the points above. Kept for the demo (its documented results)
    and for runs trained with it."""

    def __init__(self, sinc_channels=70, sinc_kernel=128, filts=(32, 32, 64, 64), gat_dims=(64, 32),
                 pool_ratios=(0.5, 0.7, 0.5, 0.5), temperatures=(2.0, 2.0, 100.0, 100.0), fs=16000,
                 sinc_stride=1, ssl_checkpoint=None, ssl_freeze=False, ssl_dim=128, dropout=0.5, branches=2,
                 front_log=False, block_pool=None):
        super().__init__()
        sinc = None if ssl_checkpoint else SincConv(sinc_channels, sinc_kernel, fs, stride=sinc_stride)
        self._build_front(sinc, sinc_channels, ssl_checkpoint, ssl_freeze, ssl_dim, filts, front_log, block_pool,
                          preact=True)
        c = filts[-1]
        self.attention = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.SELU(), nn.Conv2d(2 * c, c, 1))
        self.gat_s = GAT(c, gat_dims[0], temperatures[0])
        self.gat_t = GAT(c, gat_dims[0], temperatures[1])
        self.pool_s = GraphPool(gat_dims[0], pool_ratios[0])
        self.pool_t = GraphPool(gat_dims[0], pool_ratios[1])
        self.branches = nn.ModuleList()
        self.masters = nn.ParameterList()
        for _ in range(branches):
            self.branches.append(nn.ModuleList([HSGAL(gat_dims[0], gat_dims[1], temperatures[2]),
                                                HSGAL(gat_dims[1], gat_dims[1], temperatures[2]),
                                                GraphPool(gat_dims[1], pool_ratios[2]),
                                                GraphPool(gat_dims[1], pool_ratios[3])]))
            self.masters.append(nn.Parameter(torch.randn(1, 1, gat_dims[0])))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(5 * gat_dims[1], 2)

    def forward(self, x):
        z = self.encode(x)                                                          # (B, C, F', T')
        w = self.attention(z)
        s_nodes = (z * F.softmax(w, dim=-1)).sum(-1).transpose(1, 2)               # (B, F', C)
        t_nodes = (z * F.softmax(w, dim=-2)).sum(-2).transpose(1, 2)               # (B, T', C)
        s = self.pool_s(self.gat_s(s_nodes))
        t = self.pool_t(self.gat_t(t_nodes))
        outs = []
        for (l1, l2, pt, ps), m in zip(self.branches, self.masters):
            t1, s1, m1 = l1(t, s, m.expand(x.shape[0], -1, -1))
            t1, s1 = pt(t1), ps(s1)
            t2, s2, m2 = l2(t1, s1, m1)
            outs.append((t1 + t2, s1 + s2, m1 + m2))
        tt = torch.stack([o[0] for o in outs]).amax(0)
        ss = torch.stack([o[1] for o in outs]).amax(0)
        mm = torch.stack([o[2] for o in outs]).amax(0)
        feat = torch.cat([tt.abs().amax(1), tt.mean(1), ss.abs().amax(1), ss.mean(1), mm.squeeze(1)], dim=1)
        return self.head(self.drop(feat))


def load_clovaai_state_dict(model, state_dict, strict=True):
    """Load a clovaai/aasist ``Model`` state dict (e.g. their ``AASIST.pth`` / ``AASIST-L.pth``)
    into an :class:`AASIST` of the same configuration (``build_model("aasist")`` /
    ``("aasist_l")``). Returns what ``load_state_dict`` returns."""
    if not isinstance(model, AASIST) or model.ssl is not None or len(model.branches) != 2:
        raise ValueError("load_clovaai_state_dict: needs a two-branch AASIST with the sinc front end")
    gat = {"att_proj": "att_proj", "att_weight": "att_w", "proj_with_att": "proj_att",
           "proj_without_att": "proj", "bn": "bn"}
    hs = {"proj_type1": "in_t", "proj_type2": "in_s", "att_proj": "att_proj", "att_projM": "att_proj_m",
          "att_weightM": "att_w_m", "proj_with_att": "proj_att", "proj_without_att": "proj",
          "proj_with_attM": "proj_att_m", "proj_without_attM": "proj_m", "bn": "bn"}
    prefix = {"first_bn": "bn0", "GAT_layer_S": "gat_s", "GAT_layer_T": "gat_t", "pool_S": "pool_s",
              "pool_T": "pool_t", "out_layer": "head", "HtrgGAT_layer_ST11": "branches.0.hs1",
              "HtrgGAT_layer_ST12": "branches.0.hs2", "HtrgGAT_layer_ST21": "branches.1.hs1",
              "HtrgGAT_layer_ST22": "branches.1.hs2", "pool_hS1": "branches.0.pool_s",
              "pool_hT1": "branches.0.pool_t", "pool_hS2": "branches.1.pool_s", "pool_hT2": "branches.1.pool_t"}
    out, pair_w = {}, {}
    for key, v in state_dict.items():
        head, _, rest = key.partition(".")
        if key in ("pos_S", "master1", "master2"):
            out[{"pos_S": "pos_s", "master1": "masters.0", "master2": "masters.1"}[key]] = v
        elif head == "encoder":                        # encoder.<i>.0.<layer>.<param>
            _, i, _, layer, param = key.split(".")
            out[f"encoder.{i}.{'down' if layer == 'conv_downsample' else layer}.{param}"] = v
        elif head.startswith("HtrgGAT") and rest in ("att_weight11", "att_weight22", "att_weight12"):
            pair_w.setdefault(prefix[head], {})[rest[-2:]] = v
        elif head in prefix:                           # <module>.<param> or <module>.<layer>.<param>
            names = hs if head.startswith("HtrgGAT") else gat if head.startswith("GAT") else {"proj": "score"}
            parts = rest.split(".")
            parts[0] = names.get(parts[0], parts[0])
            out[".".join([prefix[head]] + parts)] = v
        else:
            out[key] = v                               # unknown: load_state_dict names it
    for p, w in pair_w.items():
        if set(w) != {"11", "22", "12"}:
            raise ValueError(f"load_clovaai_state_dict: {p} lacks one of att_weight11/22/12")
        out[f"{p}.att_w"] = torch.stack([w["11"], w["22"], w["12"]])   # T-T, S-S, T-S
    return model.load_state_dict(out, strict=strict)


# ------------------------------------------------------------------------------- RawNet2

class Res1d(nn.Module):
    """RawNet2 block: [BN-LReLU] conv3 BN LReLU conv3 + skip, max-pool 3, then filter-wise
    feature-map scaling ``x * s + s`` with ``s = sigmoid(fc(mean_t x))``."""

    def __init__(self, cin, cout, first=False):
        super().__init__()
        self.first = first
        if not first:
            self.bn1 = nn.BatchNorm1d(cin)
        self.conv1 = nn.Conv1d(cin, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, padding=1)
        self.down = nn.Conv1d(cin, cout, 1) if cin != cout else None
        self.pool = nn.MaxPool1d(3)
        self.fms = nn.Linear(cout, cout)

    def forward(self, x):
        out = x if self.first else F.leaky_relu(self.bn1(x), 0.3)
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(out)), 0.3))
        out = self.pool(out + (self.down(x) if self.down is not None else x))
        s = torch.sigmoid(self.fms(out.mean(-1)))[:, :, None]
        return out * s + s


class RawNet2(nn.Module):
    """RawNet2-style countermeasure (original: sinc 20 x 1024, filts [20, 20, 128, 128, 128, 128],
    GRU 1024 x 3 layers, fc 1024)."""

    def __init__(self, sinc_channels=20, sinc_kernel=1024, filts=(20, 20, 128, 128, 128, 128), gru_hidden=1024,
                 gru_layers=3, fc_dim=1024, fs=16000, sinc_stride=1, dropout=0.0):
        super().__init__()
        self.sinc = SincConv(sinc_channels, sinc_kernel, fs, stride=sinc_stride)
        self.bn0 = nn.BatchNorm1d(sinc_channels)
        blocks, cin = [], sinc_channels
        for i, c in enumerate(filts):
            blocks.append(Res1d(cin, c, first=(i == 0)))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.bn_pre = nn.BatchNorm1d(cin)
        self.gru = nn.GRU(cin, gru_hidden, num_layers=gru_layers, batch_first=True,
                          dropout=dropout if gru_layers > 1 else 0.0)
        self.fc = nn.Linear(gru_hidden, fc_dim)
        self.head = nn.Linear(fc_dim, 2)

    def forward(self, x):
        z = F.max_pool1d(self.sinc(x).abs(), 3)
        z = F.leaky_relu(self.bn0(z), 0.3)
        z = F.leaky_relu(self.bn_pre(self.blocks(z)), 0.3)
        self.gru.flatten_parameters()
        out, _ = self.gru(z.transpose(1, 2))
        return self.head(self.fc(out[:, -1]))


# ------------------------------------------------------------------------------ factory

# clovaai/aasist's AASIST-L.conf: filts [70, [1, 32], [32, 32], [32, 24], [24, 24]] (the last
# width repeated for blocks 4-6), gat_dims [24, 32], pool_ratios [0.4, 0.5, 0.7, 0.5]
AASIST_L = {"filts": (32, 32, 24, 24, 24, 24), "gat_dims": (24, 32), "pool_ratios": (0.4, 0.5, 0.7, 0.5)}
_MODELS = {"aasist": (AASIST, {}), "aasist_l": (AASIST, AASIST_L), "aasist_ssl_readout": (AASISTSSLReadout, {}),
           "rawnet2": (RawNet2, {})}
MODELS = tuple(_MODELS)
AASIST_FAMILY = ("aasist", "aasist_l", "aasist_ssl_readout")  # the models that take an SSL front end


def build_model(name, fs=16000, **kw):
    """``name`` in MODELS; keyword arguments are the model's (unknown ones: a clear error);
    ``aasist_l`` is :class:`AASIST` with the AASIST-L widths unless ``kw`` overrides them."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    cls, defaults = _MODELS[name]
    import inspect
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "fs"}
    bad = sorted(set(kw) - allowed)
    if bad:
        raise ValueError(f"model {name!r} has no option(s) {bad}; options: {sorted(allowed)}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in {**defaults, **kw}.items()}
    return cls(fs=fs, **kw)


def model_from_settings(m, fs=16000):
    """The model a config's ``model`` section describes: ``m.name`` with the options of the
    section named after it, plus ``m.ssl_checkpoint`` / ``m.ssl_freeze`` for the AASIST family."""
    kw = dict(m[m.name]) if m.name in m else {}
    if m.ssl_checkpoint:
        if m.name not in AASIST_FAMILY:
            raise ValueError(f"model.ssl_checkpoint works with model.name in {AASIST_FAMILY} (SSL-AASIST), "
                             f"not {m.name!r}")
        kw.update(ssl_checkpoint=m.ssl_checkpoint, ssl_freeze=m.ssl_freeze)
    elif m.name in AASIST_FAMILY:
        kw.pop("ssl_dim", None)
    return build_model(m.name, fs=fs, **kw)
