"""End-to-end training-step time on the apps' real models.

Image (RoGA paper): the ResNet-34 detector, K=3 domains with one batch each.
  * ERM step: forward + backward on the K batches concatenated, base step.
  * RoGA step: per domain forward/backward, perturb, forward/backward (BatchNorm frozen),
    accumulate; base step — roga_cuda's RoGA, and the public-code approach (per-parameter
    loops that clone every step).
  * twin: the same 2K forward/backward passes and one base step, no optimizer work.
  * RoGA graphed (CUDA): RoGA(capturable=True) with each optimizer call replayed from a CUDA
    graph, the forward/backward passes eager between them (on CPU: the same calls, eager).
  Target: RoGA step <= 1.05 x (2 x ERM step).
Speech (DPDA paper): the AASIST-style model, clean and RawBoost-augmented paths (the
augmentation is precomputed: this times training, not data preparation).
  * PCGrad step: one forward on the concatenated batch, the two losses' gradients, surgery,
    base step — roga_cuda's PCGrad and the public pc_backward approach (torch.cat flattening).
  * twin: the same forward and two backwards summed into .grad, base step.
  Target: PCGrad step <= 1.05 x twin.
Overhead = (step - twin) / step: the share of the step spent in optimizer work.

    python -m benchmarks.bench_e2e --device cpu
"""
import argparse
import json

import torch
import torch.nn.functional as F

from roga_cuda import PCGrad, RoGA, freeze_bn_stats

from .bench_optim import PublicRoGA, public_pc_project
from .timing import interleaved, machine, median

DEFAULTS = {  # realistic batch sizes on a GPU, scaled down to stay affordable on 2 CPU cores
    "cuda": {"image_batch": 32, "image_size": 224, "speech_batch": 24, "speech_len": 64600, "reps": 10},
    "cpu": {"image_batch": 8, "image_size": 112, "speech_batch": 8, "speech_len": 16000, "reps": 5},
}


def image_variants(device, batch, size, k=3, backend="auto"):
    from roga_cuda.apps.image.models import build_model
    torch.manual_seed(0)
    model = build_model("resnet34").to(device)
    g = torch.Generator().manual_seed(0)
    doms = [(torch.randn(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, 2, (batch,), generator=g).float().to(device)) for _ in range(k)]
    xa, ya = torch.cat([x for x, _ in doms]), torch.cat([y for _, y in doms])

    def loss(x, y):
        return F.binary_cross_entropy_with_logits(model(x).squeeze(1), y)

    base = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    roga = RoGA(model.parameters(), torch.optim.SGD, lr=1e-4, momentum=0.9, rho=0.1, alpha=2e-4,
                num_domains=k, backend=backend)
    pub = PublicRoGA(model.parameters(), lr=1e-4)

    def erm():
        base.zero_grad()
        loss(xa, ya).backward()
        base.step()

    def twin():
        base.zero_grad()
        for x, y in doms:
            loss(x, y).backward()
            with freeze_bn_stats(model):
                loss(x, y).backward()
        base.step()

    def ours():
        roga.zero_grad()
        for x, y in doms:
            loss(x, y).backward()
            roga.perturb()
            with freeze_bn_stats(model):
                loss(x, y).backward()
            roga.accumulate()
        roga.step()

    def public():
        for x, y in doms:
            loss(x, y).backward()
            pub.perturb()
            with freeze_bn_stats(model):
                loss(x, y).backward()
            pub.accumulate()
        pub.step(k)

    return {"erm": erm, "twin": twin, "roga": ours, "roga_public": public,
            "roga_graph": _graphed_roga(model, loss, doms, device, backend)}


def _graphed_roga(model, loss, doms, device, backend):
    """RoGA(capturable=True), its calls captured in CUDA graphs on the first call (after two
    eager warm-up steps) and replayed after; on CPU the same calls, eager."""
    from .bench_graphs import roga_calls, warm_up
    device = torch.device(device)
    params = list(model.parameters())
    opt = RoGA(params, torch.optim.SGD, lr=1e-4, momentum=0.9, rho=0.1, alpha=2e-4, num_domains=len(doms),
               capturable=True, backend=backend)
    static = []
    calls = None

    def step(call):
        for p, g in zip(params, static):  # the other variants hand .grad other tensors
            p.grad = g
        opt.zero_grad(set_to_none=False)
        for d, (x, y) in enumerate(doms):
            loss(x, y).backward()
            call(("perturb", d))
            with freeze_bn_stats(model):
                loss(x, y).backward()
            call(("accumulate", d))
        call("step")

    def eager(name):
        return opt.step() if name == "step" else getattr(opt, name[0])()

    def graphed():
        nonlocal calls
        if calls is None:
            opt.zero_grad(set_to_none=True)
            for x, y in doms:  # every parameter's .grad, once: the tensors the graphs keep
                loss(x, y).backward()
            static[:] = [p.grad for p in params]
            warm_up(lambda: step(eager), device)
            calls = roga_calls(opt, device.type == "cuda")
        step(lambda name: calls[name]())
    return graphed


def speech_variants(device, batch, length, backend="auto"):
    from roga_cuda.apps.speech.models import build_model
    from roga_cuda.apps.speech.rawboost import rawboost
    torch.manual_seed(0)
    model = build_model("aasist").to(device)
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(batch, length, generator=g).mul_(0.1).to(device)
    aug = rawboost(clean, algo=4, generator=torch.Generator(device=clean.device).manual_seed(1))
    y = torch.randint(0, 2, (batch,), generator=g).to(device)
    x = torch.cat([clean, aug])
    w = torch.tensor([0.1, 0.9], device=device)

    def losses():
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        return F.cross_entropy(out[:batch], y, weight=w), F.cross_entropy(out[batch:], y, weight=w)

    params = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    pc = PCGrad(params, torch.optim.AdamW, lr=1e-5, backend=backend)

    def twin():
        base.zero_grad()
        l1, l2 = losses()
        l1.backward(retain_graph=True)
        l2.backward()
        base.step()

    def ours():
        pc.zero_grad()
        pc.backward(list(losses()))
        pc.step()

    def public():  # pc_backward: autograd per loss, flatten, project, unflatten
        base.zero_grad()
        l1, l2 = losses()
        grads = []
        for i, l in enumerate((l1, l2)):
            gs = torch.autograd.grad(l, params, retain_graph=i == 0, allow_unused=True)
            grads.append(torch.cat([(t if t is not None else torch.zeros_like(p)).flatten() for t, p in zip(gs, params)]))
        merged = public_pc_project(grads)
        idx = 0
        for p in params:
            p.grad = merged[idx:idx + p.numel()].view_as(p).clone()
            idx += p.numel()
        base.step()

    return {"twin": twin, "pcgrad": ours, "pcgrad_public": public}


def run(device="cpu", reps=None, backend="auto", log=print, **sizes):
    device = torch.device(device)
    cfg = dict(DEFAULTS["cuda" if device.type == "cuda" else "cpu"])
    cfg.update({k: v for k, v in sizes.items() if v is not None})
    reps = reps or cfg["reps"]
    res = {"machine": machine(device), "config": cfg}
    t = interleaved(image_variants(device, cfg["image_batch"], cfg["image_size"], backend=backend),
                    reps=reps, warmup=1, device=device)
    im = {k: median(v) for k, v in t.items()}
    res["image"] = dict(im, roga_vs_2erm=im["roga"] / (2 * im["erm"]),
                        public_vs_2erm=im["roga_public"] / (2 * im["erm"]),
                        overhead=(im["roga"] - im["twin"]) / im["roga"],
                        graph_vs_2erm=im["roga_graph"] / (2 * im["erm"]),
                        graph_overhead=(im["roga_graph"] - im["twin"]) / im["roga_graph"],
                        public_overhead=(im["roga_public"] - im["twin"]) / im["roga_public"])
    t = interleaved(speech_variants(device, cfg["speech_batch"], cfg["speech_len"], backend=backend),
                    reps=reps, warmup=1, device=device)
    sp = {k: median(v) for k, v in t.items()}
    res["speech"] = dict(sp, pcgrad_vs_twin=sp["pcgrad"] / sp["twin"], public_vs_twin=sp["pcgrad_public"] / sp["twin"],
                         overhead=(sp["pcgrad"] - sp["twin"]) / sp["pcgrad"],
                         public_overhead=(sp["pcgrad_public"] - sp["twin"]) / sp["pcgrad_public"])
    log(format_result(res))
    return res


def format_result(res):
    c, im, sp = res["config"], res["image"], res["speech"]
    return "\n".join([
        f"\n### End-to-end training steps ({res['machine']['device']})\n",
        f"Image: ResNet-34, K=3 domains x batch {c['image_batch']} at {c['image_size']}px. "
        f"Speech: AASIST-style, batch {c['speech_batch']} clean + {c['speech_batch']} RawBoost, {c['speech_len']} samples.\n",
        "| step | median | ratio | optimizer overhead |", "|---|---:|---:|---:|",
        f"| image ERM (K batches) | {im['erm'] * 1e3:.1f} ms | | |",
        f"| image twin (2K passes, no optimizer work) | {im['twin'] * 1e3:.1f} ms | | |",
        f"| image RoGA, roga_cuda | {im['roga'] * 1e3:.1f} ms | {im['roga_vs_2erm']:.3f} x (2 x ERM) | {100 * im['overhead']:.1f}% |",
        f"| image RoGA, public-code loops | {im['roga_public'] * 1e3:.1f} ms | {im['public_vs_2erm']:.3f} x (2 x ERM) | {100 * im['public_overhead']:.1f}% |",
        f"| image RoGA, capturable, {'CUDA graphs' if res['machine']['device'] != 'cpu' else 'eager (CPU)'} | "
        f"{im['roga_graph'] * 1e3:.1f} ms | {im['graph_vs_2erm']:.3f} x (2 x ERM) | {100 * im['graph_overhead']:.1f}% |",
        f"| speech twin (forward + 2 backwards) | {sp['twin'] * 1e3:.1f} ms | | |",
        f"| speech DPDA + PCGrad, roga_cuda | {sp['pcgrad'] * 1e3:.1f} ms | {sp['pcgrad_vs_twin']:.3f} x twin | {100 * sp['overhead']:.1f}% |",
        f"| speech DPDA + PCGrad, public pc_backward | {sp['pcgrad_public'] * 1e3:.1f} ms | {sp['public_vs_twin']:.3f} x twin | {100 * sp['public_overhead']:.1f}% |",
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--image-batch", type=int)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--speech-batch", type=int)
    ap.add_argument("--speech-len", type=int)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = run(a.device, a.reps, a.backend, image_batch=a.image_batch, image_size=a.image_size,
              speech_batch=a.speech_batch, speech_len=a.speech_len)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
