"""Countermeasure models: AASIST-style and RawNet2-style, with an optional SSL front end.

* :class:`AASIST` (Jung et al. 2022): a fixed mel-spaced sinc filterbank on the raw
  waveform, a 2-D residual encoder, spectral and temporal graph attention with graph
  pooling, a heterogeneous stacking graph attention layer with a master node, and a
  max/mean readout. Widths are configurable so the same code runs the full model on a GPU
  and a small one on a laptop CPU. With ``ssl_checkpoint`` the sinc front end is replaced by
  a self-supervised model's features (as in SSL-AASIST).
* :class:`RawNet2` (Tak et al. 2021): sinc filters, 1-D residual blocks with filter-wise
  feature-map scaling, a GRU and a linear head.

Both return logits (B, 2): index 1 = bona fide (the score), index 0 = spoof.
"""
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

class Res2d(nn.Module):
    """AASIST encoder block: [BN-SELU] conv(2,3) BN SELU conv(2,3) + skip, max-pool (1,3)."""

    def __init__(self, cin, cout, first=False):
        super().__init__()
        self.first = first
        if not first:
            self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, (2, 3), padding=(1, 1))
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, (2, 3), padding=(0, 1))
        self.down = nn.Conv2d(cin, cout, (1, 3), padding=(0, 1)) if cin != cout else None
        self.pool = nn.MaxPool2d((1, 3))

    def forward(self, x):
        out = x if self.first else F.selu(self.bn1(x))
        out = self.conv2(F.selu(self.bn2(self.conv1(out))))
        skip = self.down(x) if self.down is not None else x
        return self.pool(out + skip)


class GAT(nn.Module):
    """Graph attention layer over fully connected nodes (AASIST's): attention from the
    element-wise product of node pairs, temperature-scaled softmax, with- and
    without-attention projections summed, BatchNorm, SELU."""

    def __init__(self, din, dout, temperature=1.0, dropout=0.2):
        super().__init__()
        self.att_proj = nn.Linear(din, dout)
        self.att_w = nn.Parameter(torch.randn(dout, 1) / math.sqrt(dout))
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
        return F.selu(self.bn(y.transpose(1, 2)).transpose(1, 2))


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
    to all nodes."""

    def __init__(self, din, dout, temperature=1.0, dropout=0.2):
        super().__init__()
        self.in_t, self.in_s = nn.Linear(din, din), nn.Linear(din, din)
        self.att_proj = nn.Linear(din, dout)
        self.att_w = nn.Parameter(torch.randn(3, dout, 1) / math.sqrt(dout))   # TT, SS, TS
        self.att_proj_m = nn.Linear(din, dout)
        self.att_w_m = nn.Parameter(torch.randn(dout, 1) / math.sqrt(dout))
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
        y = F.selu(self.bn(y.transpose(1, 2)).transpose(1, 2))
        return y[:, :nt], y[:, nt:], master


class AASIST(nn.Module):
    """AASIST-style countermeasure. Defaults follow the paper's layout at a reduced width
    (``filts`` and ``gat_dims``); the original: sinc_channels=70, sinc_kernel=128,
    filts=[32, 32, 64, 64, 64, 64]-like encoder, gat_dims=[64, 32], pool_ratios=[0.5, 0.7, 0.5, 0.5].
    ``front_log`` (not in the paper) log-compresses the sinc magnitudes."""

    def __init__(self, sinc_channels=70, sinc_kernel=128, filts=(32, 32, 64, 64), gat_dims=(64, 32),
                 pool_ratios=(0.5, 0.7, 0.5, 0.5), temperatures=(2.0, 2.0, 100.0, 100.0), fs=16000,
                 sinc_stride=1, ssl_checkpoint=None, ssl_freeze=False, ssl_dim=128, dropout=0.5, branches=2,
                 front_log=False):
        super().__init__()
        self.front_log = bool(front_log)
        self.ssl = SSLFrontEnd(ssl_checkpoint, ssl_freeze) if ssl_checkpoint else None
        if self.ssl is None:
            self.sinc = SincConv(sinc_channels, sinc_kernel, fs, stride=sinc_stride)
        else:
            self.ssl_proj = nn.LazyLinear(ssl_dim)  # the SSL feature size is known only after loading
        self.bn0 = nn.BatchNorm2d(1)
        blocks, cin = [], 1
        for i, c in enumerate(filts):
            blocks.append(Res2d(cin, c, first=(i == 0)))
            cin = c
        self.encoder = nn.Sequential(*blocks)
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

    def front(self, x):
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

    def forward(self, x):
        z = self.encoder(self.front(x))                                             # (B, C, F', T')
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

MODELS = ("aasist", "rawnet2")


def build_model(name, fs=16000, **kw):
    """``name`` in MODELS; keyword arguments are the model's (unknown ones: a clear error)."""
    cls = {"aasist": AASIST, "rawnet2": RawNet2}.get(name)
    if cls is None:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    import inspect
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    bad = sorted(set(kw) - allowed)
    if bad:
        raise ValueError(f"model {name!r} has no option(s) {bad}; options: {sorted(allowed)}")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    return cls(fs=fs, **kw)
