"""AASIST against a compact float64 re-statement of clovaai/aasist's model, written here from
the original's definition (models/AASIST.py, AASIST.conf / AASIST-L.conf), sharing weights.

The re-statement reads the weights by the original's parameter names, so the same random
state dict drives both: ``load_clovaai_state_dict`` must load it strictly (every layer of
the original, nothing else), and the outputs and gradients must agree in eval and in
training mode (same seed: the same Dropout masks, drawn in the original's order).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from roga_cuda.apps.speech.models import (AASIST, AASISTSSLReadout, MelSincBank, build_model,
                                          load_clovaai_state_dict)

from util import tiny_ssl_checkpoint

# clovaai/aasist config/AASIST.conf and config/AASIST-L.conf, model_config
AASIST_CONF = {"first_conv": 128, "filts": [70, [1, 32], [32, 32], [32, 64], [64, 64]], "gat_dims": [64, 32],
               "pool_ratios": [0.5, 0.7, 0.5, 0.5], "temperatures": [2.0, 2.0, 100.0, 100.0]}
AASIST_L_CONF = {"first_conv": 128, "filts": [70, [1, 32], [32, 32], [32, 24], [24, 24]], "gat_dims": [24, 32],
                 "pool_ratios": [0.4, 0.5, 0.7, 0.5], "temperatures": [2.0, 2.0, 100.0, 100.0]}


def blocks(conf):
    """(in, out) widths of the six residual blocks: filts[1..4], the last repeated twice more."""
    f = conf["filts"]
    return [tuple(f[1]), tuple(f[2]), tuple(f[3]), tuple(f[4]), tuple(f[4]), tuple(f[4])]


def original_shapes(conf):
    """{name: shape} of the original Model's parameters and {name: shape} of its BN buffers."""
    params, bufs = {}, {}

    def linear(name, i, o):
        params[f"{name}.weight"], params[f"{name}.bias"] = (o, i), (o,)

    def bn(name, c):
        params[f"{name}.weight"] = params[f"{name}.bias"] = (c,)
        bufs[f"{name}.running_mean"] = bufs[f"{name}.running_var"] = (c,)
        bufs[f"{name}.num_batches_tracked"] = ()

    def conv(name, i, o, kh, kw):
        params[f"{name}.weight"], params[f"{name}.bias"] = (o, i, kh, kw), (o,)

    g0, g1 = conf["gat_dims"]
    c = conf["filts"][-1][-1]
    bn("first_bn", 1)
    for i, (ci, co) in enumerate(blocks(conf)):
        p = f"encoder.{i}.0"
        if i:
            bn(f"{p}.bn1", ci)
        conv(f"{p}.conv1", ci, co, 2, 3)
        bn(f"{p}.bn2", co)
        conv(f"{p}.conv2", co, co, 2, 3)
        if ci != co:
            conv(f"{p}.conv_downsample", ci, co, 1, 3)
    params["pos_S"] = (1, conf["filts"][0] // 3, c)
    params["master1"] = params["master2"] = (1, 1, g0)
    for name in ("GAT_layer_S", "GAT_layer_T"):
        linear(f"{name}.att_proj", c, g0)
        params[f"{name}.att_weight"] = (g0, 1)
        linear(f"{name}.proj_with_att", c, g0)
        linear(f"{name}.proj_without_att", c, g0)
        bn(f"{name}.bn", g0)
    for name, din in (("ST11", g0), ("ST12", g1), ("ST21", g0), ("ST22", g1)):
        p = f"HtrgGAT_layer_{name}"
        linear(f"{p}.proj_type1", din, din)
        linear(f"{p}.proj_type2", din, din)
        for lin in ("att_proj", "att_projM", "proj_with_att", "proj_without_att", "proj_with_attM",
                    "proj_without_attM"):
            linear(f"{p}.{lin}", din, g1)
        for w in ("11", "22", "12", "M"):
            params[f"{p}.att_weight{w}"] = (g1, 1)
        bn(f"{p}.bn", g1)
    linear("pool_S.proj", g0, 1)
    linear("pool_T.proj", g0, 1)
    for name in ("pool_hS1", "pool_hT1", "pool_hS2", "pool_hT2"):
        linear(f"{name}.proj", g1, 1)
    linear("out_layer", 5 * g1, 2)
    return params, bufs


def random_weights(conf, seed):
    g = torch.Generator().manual_seed(seed)
    params, bufs = original_shapes(conf)
    w = {}
    for k, shape in params.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 and k not in ("pos_S", "master1", "master2") else 1
        w[k] = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
        if k.endswith(".weight") and len(shape) == 1:     # BatchNorm scales around 1
            w[k] = 1 + 0.2 * w[k]
    for k, shape in bufs.items():
        if k.endswith("num_batches_tracked"):
            w[k] = torch.tensor(3)
        elif k.endswith("running_var"):
            w[k] = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        else:
            w[k] = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    return w


# ----------------------------------------------------------------- the re-statement

def sinc_bank(out_channels, kernel, fs=16000):
    """The original's CONV filters: edges equally spaced in mel between the mel values of
    0 and fs/2 (taken over a 257-point frequency grid), ideal band-pass as the difference of
    two low-passes, Hamming window; odd length."""
    k = kernel + 1 if kernel % 2 == 0 else kernel
    mel = lambda hz: 2595 * np.log10(1 + hz / 700)          # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)               # noqa: E731
    grid = mel(int(fs / 2) * np.linspace(0, 1, 257))
    edges = hz(np.linspace(grid.min(), grid.max(), out_channels + 1))
    n = np.arange(-(k - 1) / 2, (k - 1) / 2 + 1)
    rows = [np.hamming(k) * (2 * b / fs * np.sinc(2 * b * n / fs) - 2 * a / fs * np.sinc(2 * a * n / fs))
            for a, b in zip(edges[:-1], edges[1:])]
    return torch.tensor(np.array(rows))[:, None, :]


def reference(W, x, conf, train):
    """clovaai/aasist Model.forward (returns the logits), re-stated."""
    drop = lambda v, p: F.dropout(v, p, training=train)       # noqa: E731
    lin = lambda n, v: F.linear(v, W[f"{n}.weight"], W[f"{n}.bias"])  # noqa: E731

    def bn(n, v):  # momentum irrelevant: the running statistics are copies
        return F.batch_norm(v, W[f"{n}.running_mean"].clone(), W[f"{n}.running_var"].clone(), W[f"{n}.weight"],
                            W[f"{n}.bias"], training=train, eps=1e-5)

    def bn_nodes(n, v):  # the original views (B, N, D) as (B N, D)
        return bn(n, v.reshape(-1, v.shape[-1])).view(v.shape)

    def gat(n, v, temp):
        v = drop(v, 0.2)
        pair = v.unsqueeze(2).expand(-1, -1, v.shape[1], -1)
        a = torch.tanh(lin(f"{n}.att_proj", pair * pair.transpose(1, 2))) @ W[f"{n}.att_weight"]
        a = F.softmax(a / temp, dim=-2).squeeze(-1)
        return F.selu(bn_nodes(f"{n}.bn", lin(f"{n}.proj_with_att", a @ v) + lin(f"{n}.proj_without_att", v)))

    def htrg(n, v1, v2, master, temp):
        n1 = v1.shape[1]
        v = drop(torch.cat([lin(f"{n}.proj_type1", v1), lin(f"{n}.proj_type2", v2)], 1), 0.2)
        pair = v.unsqueeze(2).expand(-1, -1, v.shape[1], -1)
        h = torch.tanh(lin(f"{n}.att_proj", pair * pair.transpose(1, 2)))
        board = torch.zeros_like(h[..., :1])
        board[:, :n1, :n1] = h[:, :n1, :n1] @ W[f"{n}.att_weight11"]
        board[:, n1:, n1:] = h[:, n1:, n1:] @ W[f"{n}.att_weight22"]
        board[:, :n1, n1:] = h[:, :n1, n1:] @ W[f"{n}.att_weight12"]
        board[:, n1:, :n1] = h[:, n1:, :n1] @ W[f"{n}.att_weight12"]
        a = F.softmax(board / temp, dim=-2).squeeze(-1)
        am = torch.tanh(lin(f"{n}.att_projM", v * master)) @ W[f"{n}.att_weightM"]
        am = F.softmax(am / temp, dim=-2)
        master = lin(f"{n}.proj_with_attM", am.squeeze(-1).unsqueeze(1) @ v) + lin(f"{n}.proj_without_attM", master)
        out = F.selu(bn_nodes(f"{n}.bn", lin(f"{n}.proj_with_att", a @ v) + lin(f"{n}.proj_without_att", v)))
        return out[:, :n1], out[:, n1:], master

    def pool(n, h, k):
        s = torch.sigmoid(lin(f"{n}.proj", drop(h, 0.3)))
        idx = torch.topk(s, max(int(h.shape[1] * k), 1), dim=1).indices.expand(-1, -1, h.shape[2])
        return torch.gather(h * s, 1, idx)

    def block(i, v):
        n = f"encoder.{i}.0"
        # the original computes selu(bn1(v)) here and never uses it
        out = F.conv2d(v, W[f"{n}.conv1.weight"], W[f"{n}.conv1.bias"], padding=(1, 1))
        out = F.conv2d(F.selu(bn(f"{n}.bn2", out)), W[f"{n}.conv2.weight"], W[f"{n}.conv2.bias"], padding=(0, 1))
        if f"{n}.conv_downsample.weight" in W:
            v = F.conv2d(v, W[f"{n}.conv_downsample.weight"], W[f"{n}.conv_downsample.bias"], padding=(0, 1))
        return F.max_pool2d(out + v, (1, 3))

    ratios, temps = conf["pool_ratios"], conf["temperatures"]
    e = F.conv1d(x.unsqueeze(1), sinc_bank(conf["filts"][0], conf["first_conv"]))   # no padding
    e = F.selu(bn("first_bn", F.max_pool2d(e.unsqueeze(1).abs(), (3, 3))))
    for i in range(6):
        e = block(i, e)
    out_s = pool("pool_S", gat("GAT_layer_S", torch.max(e.abs(), dim=3)[0].transpose(1, 2) + W["pos_S"], temps[0]),
                 ratios[0])
    out_t = pool("pool_T", gat("GAT_layer_T", torch.max(e.abs(), dim=2)[0].transpose(1, 2), temps[1]), ratios[1])
    outs = []
    for b in ("1", "2"):
        t1, s1, m1 = htrg(f"HtrgGAT_layer_ST{b}1", out_t, out_s, W[f"master{b}"], temps[2])
        s1 = pool(f"pool_hS{b}", s1, ratios[2])
        t1 = pool(f"pool_hT{b}", t1, ratios[2])
        t2, s2, m2 = htrg(f"HtrgGAT_layer_ST{b}2", t1, s1, m1, temps[2])
        outs.append((t1 + t2, s1 + s2, m1 + m2))
    t1, t2, s1, s2, m1, m2 = (drop(v, 0.2) for v in (outs[0][0], outs[1][0], outs[0][1], outs[1][1],
                                                        outs[0][2], outs[1][2]))
    t, s, m = torch.max(t1, t2), torch.max(s1, s2), torch.max(m1, m2)
    hidden = torch.cat([torch.max(t.abs(), dim=1)[0], t.mean(1), torch.max(s.abs(), dim=1)[0], s.mean(1),
                        m.squeeze(1)], dim=1)
    return lin("out_layer", drop(hidden, 0.5))


# ------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("name,conf,count", [("aasist", AASIST_CONF, 297_866), ("aasist_l", AASIST_L_CONF, 85_306)])
def test_parameter_counts(name, conf, count):
    params, _ = original_shapes(conf)
    assert sum(math.prod(s) for s in params.values()) == count   # the published counts, from the definition
    m = build_model(name)
    assert sum(p.numel() for p in m.parameters()) == count
    shapes = []
    for k, p in m.named_parameters():  # HS-GAL's three pair-attention vectors are stacked in one tensor
        shapes += [tuple(p.shape[1:])] * 3 if k.endswith("hs1.att_w") or k.endswith("hs2.att_w") else [tuple(p.shape)]
    assert sorted(shapes) == sorted(tuple(s) for s in params.values())


def test_earlier_variant_parameter_count():
    """aasist_ssl_readout at AASIST.conf widths = AASIST + its attention convs - pos_S."""
    c = 64
    attention = (c * 2 * c + 2 * c) + 2 * (2 * c) + (2 * c * c + c)         # conv1x1, BN, conv1x1
    kw = {"filts": (32, 32, 64, 64, 64, 64)}
    n = sum(p.numel() for p in build_model("aasist_ssl_readout", **kw).parameters())
    assert n == 297_866 + attention - 23 * c == 313_226


def test_sinc_bank_is_unpadded_and_matches_the_definition():
    bank = MelSincBank(70, 128)
    torch.testing.assert_close(bank.bank, sinc_bank(70, 128), rtol=0, atol=1e-15)
    x = torch.zeros(1, 64600)
    assert bank(x).shape == (1, 70, 64472)                  # 64600 - 129 + 1
    assert "bank" not in bank.state_dict()                  # a constant, as in the original
    m = build_model("aasist").eval()
    with torch.no_grad():
        assert m.encode(0.1 * torch.randn(1, 64600)).shape == (1, 64, 23, 29)  # 23 spectral, 29 temporal nodes


@pytest.mark.parametrize("name,conf,seed,modes,grads", [("aasist", AASIST_CONF, 0, (True,), True),
                                                         ("aasist_l", AASIST_L_CONF, 1, (False, True), False)])
def test_forward_and_gradients_match_the_original(name, conf, seed, modes, grads):
    """Training mode with gradients for AASIST, both modes' outputs for AASIST-L (the CPU
    time of float64 convolutions keeps the test to these)."""
    W = random_weights(conf, seed)
    model = build_model(name).double()
    res = load_clovaai_state_dict(model, W)                  # strict: every layer, nothing else
    assert not res.missing_keys and not res.unexpected_keys
    g = torch.Generator().manual_seed(seed + 10)
    x = 0.1 * torch.randn(2, 12000, generator=g, dtype=torch.float64)   # 3957 frames -> 5 temporal nodes
    for train in modes:
        model.train(train)
        ref_w = {k: v.clone().requires_grad_(train and grads and v.is_floating_point() and "running" not in k)
                 for k, v in W.items()}
        torch.manual_seed(seed + 20)                          # training: the same Dropout masks
        want = reference(ref_w, x, conf, train)
        torch.manual_seed(seed + 20)
        with torch.set_grad_enabled(train and grads):
            got = model(x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(got).all() and got.std() > 0
    if not grads:
        return
    # gradients of the same loss (training mode), through the same weights
    got.square().sum().backward()
    want.square().sum().backward()
    ref_grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v))
                 for k, v in ref_w.items() if v.requires_grad}
    mapped = build_model(name).double()
    load_clovaai_state_dict(mapped, {**W, **ref_grads})      # the reference's gradients, by our names
    expect = dict(mapped.named_parameters())
    for k, p in model.named_parameters():
        if ".bn1." in k:   # the dead pre-activation: no gradient, as in the original
            assert p.grad is None and not expect[k].any(), k
            continue
        scale = expect[k].abs().max().item() + 1.0
        torch.testing.assert_close(p.grad, expect[k].detach(), rtol=0, atol=1e-9 * scale, msg=k)


def test_dropout_layout():
    """Dropout(0.2) on each branch output (drop_way) and Dropout(0.5) on the readout, besides
    the GATs' input Dropout(0.2) and the graph pools' Dropout(0.3), as the original."""
    drops = {n: m.p for n, m in build_model("aasist").named_modules() if isinstance(m, torch.nn.Dropout)}
    assert drops.pop("drop_way") == 0.2 and drops.pop("drop") == 0.5
    assert drops == {**{f"{g}.drop": 0.2 for g in ("gat_s", "gat_t")},
                     **{f"{p}.drop": 0.3 for p in ("pool_s", "pool_t")},
                     **{f"branches.{b}.{h}.drop": 0.2 for b in (0, 1) for h in ("hs1", "hs2")},
                     **{f"branches.{b}.{p}.drop": 0.3 for b in (0, 1) for p in ("pool_s", "pool_t")}}


def test_errors_and_shapes():
    with pytest.raises(ValueError, match="no frames"):
        build_model("aasist")(torch.zeros(2, 2000))          # six /3 poolings of 624 frames: none left
    with pytest.raises(ValueError, match="batch, samples"):
        build_model("aasist")(torch.zeros(3, 1, 16000))
    with pytest.raises(ValueError, match="block_pool"):
        build_model("aasist", block_pool=0)
    with pytest.raises(ValueError, match="two-branch"):
        load_clovaai_state_dict(build_model("aasist", branches=1), {})
    with pytest.raises(ValueError, match="two-branch"):
        load_clovaai_state_dict(build_model("aasist_ssl_readout"), {})
    res = load_clovaai_state_dict(build_model("aasist"), {"pos_S": torch.zeros(1, 23, 64)}, strict=False)
    assert "head.weight" in res.missing_keys
    small = AASIST(sinc_channels=9, sinc_kernel=32, filts=(4, 8), gat_dims=(8, 4), branches=3)
    assert small(0.1 * torch.randn(2, 3000)).shape == (2, 2) and small.pos_s.shape == (1, 3, 8)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.save/load: deprecated, still supported
@pytest.mark.parametrize("cls", [AASIST, AASISTSSLReadout])
def test_ssl_front_end_composes_with_either(tmp_path, cls):
    path = tiny_ssl_checkpoint(tmp_path, stride=320)  # like XLS-R
    m = cls(filts=(4, 8, 8, 8, 8, 8), gat_dims=(8, 8), ssl_checkpoint=path, ssl_dim=30)
    x = 0.1 * torch.randn(2, 64600)                      # 201 SSL frames: six /3 poolings would leave none
    z = m.encode(x)
    assert z.shape == (2, 8, 10, 201 // 3)               # no time pooling in the blocks on SSL frames
    out = m(x)
    assert out.shape == (2, 2)
    out.sum().backward()
    assert m.ssl.model.conv.weight.grad is not None
    if cls is AASIST:
        assert m.pos_s.shape == (1, 10, 8)
