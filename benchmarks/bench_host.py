"""Host cost: what a call or an optimizer step costs the CPU when the kernels cost ~nothing.

400 one-element float32 parameters on the CPU (the DESIGN.md "host-cost proxy": on a GPU
with a small model this is the step). Interleaved medians, in one run:

* per primitive, the fast eager entry (roga_cuda._C, what roga_cuda.ops calls on plain
  tensors) vs the same operator through the dispatcher (torch.ops.roga_cuda.*.default: what
  compile/export/subclasses see), vs the public roga_cuda.ops call;
* optimizer steps vs ``torch.optim.SGD(fused=True).step()`` alone: the whole SAM step
  (first_step + second_step, zero_grad=True), the RoGA step over K=3 domains, and the
  gradient surgery of PCGrad (K=2): its backward + step minus a twin that runs the same K
  backward passes into .grad and takes the fused SGD step;
* SAM and RoGA again without reusing the written tensors' sorted ranges in the overlap
  checks (``_C._remember_overlaps(False)``): what that memo saves, in the same run. (The
  gradient lists here are the same tensors every step, unlike after a real backward; the
  memo covers only written lists, so that does not favour it.)

    python -m benchmarks.bench_host            # prints a table; --json PATH writes the numbers
"""
import argparse
import json

import torch

from roga_cuda import SAM, PCGrad, RoGA, ops
from roga_cuda.optim import _utils

from .timing import interleaved, machine, median

N = 400


def _params(n=N):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(1, generator=g)) for _ in range(n)]


def primitives(reps=400):
    """Per-call host cost of each primitive: fast entry, dispatcher, public API (seconds)."""
    from roga_cuda.ops import native
    C, R = native._C, torch.ops.roga_cuda
    g = torch.Generator().manual_seed(1)
    p = [torch.randn(1, generator=g) for _ in range(N)]
    gr = [torch.randn(1, generator=g) for _ in range(N)]
    b = [torch.empty(1) for _ in range(N)]
    a = [torch.zeros(1) for _ in range(N)]
    steps = [torch.zeros(()) for _ in range(N)]
    v = {
        "norm|fast": lambda: C.norm(gr, None, 0.0, False),
        "norm|dispatcher": lambda: R.norm.default(gr, False),
        "norm|ops": lambda: ops.norm(gr),
        "perturb_|fast": lambda: C.perturb_(p, gr, b, 1e-6, None, False, 0.0),
        "perturb_|dispatcher": lambda: R.perturb_.default(p, gr, b, 1e-6, None),
        "perturb_|ops": lambda: ops.perturb_(p, gr, b, 1e-6),
        "restore_|fast": lambda: C.restore_(p, b),
        "restore_|dispatcher": lambda: R.restore_.default(p, b),
        "restore_|ops": lambda: ops.restore_(p, b),
        "gram2|fast": lambda: C.gram([p, gr]),
        "gram2|dispatcher": lambda: R.gram.default(p + gr, 2),
        "gram2|ops": lambda: ops.gram([p, gr]),
        "combine2|fast": lambda: C.combine_(a, [a, gr], [1.0, 1e-6], None),
        "combine2|dispatcher": lambda: R.combine_.default(a, a + gr, [1.0, 1e-6], None),
        "combine2|ops": lambda: ops.combine_(a, [a, gr], [1.0, 1e-6]),
        "sgd_|fast": lambda: C.sgd_(p, [], gr, [1.0], None, [], a, steps, 1e-6, None, 0.9, 0.0, False, 0.0, False,
                                    None),
        "sgd_|dispatcher": lambda: R.sgd_.default(p, [], gr, [1.0], None, [], a, steps, 1e-6, None, 0.9, 0.0, False,
                                                  0.0, False, None),
        "sgd_|ops": lambda: ops.sgd_(p, gr, lr=1e-6, momentum_buffers=a, steps=steps, momentum=0.9),
    }
    t = interleaved(v, reps=reps, warmup=20)
    return {k: median(x) for k, x in t.items()}


def steps(reps=200):
    """Optimizer steps' host cost (seconds per step), and the surgery's (a difference)."""
    out = {}
    g = torch.Generator().manual_seed(2)
    grads = [[torch.randn(1, generator=g) for _ in range(N)] for _ in range(8)]

    base_p = _params()
    base = torch.optim.SGD(base_p, lr=1e-6, momentum=0.9, fused=True)

    def base_step():
        _utils.set_grads(base_p, grads[0])
        base.step()

    sam_p = _params()
    sam = SAM(sam_p, torch.optim.SGD, lr=1e-6, momentum=0.9, rho=1e-6, strategy="copy")

    def sam_step():
        _utils.set_grads(sam_p, grads[0])
        sam.first_step(zero_grad=True)
        _utils.set_grads(sam_p, grads[1])
        sam.second_step(zero_grad=True)

    roga_p = _params()
    roga = RoGA(roga_p, torch.optim.SGD, lr=1e-6, momentum=0.9, rho=1e-6, alpha=1e-6, num_domains=3,
                strategy="copy")

    def roga_step():
        roga.zero_grad()
        for d in range(3):
            _utils.set_grads(roga_p, grads[2 * d])
            roga.perturb()
            _utils.set_grads(roga_p, grads[2 * d + 1])
            roga.accumulate()
        roga.step()

    cap_p = _params()
    cap = RoGA(cap_p, torch.optim.SGD, lr=1e-6, momentum=0.9, rho=1e-6, alpha=1e-6, num_domains=3, capturable=True)
    cap_grads = [torch.zeros_like(p) for p in cap_p]
    _utils.set_grads(cap_p, cap_grads)

    def roga_static_step():  # capturable=True: "backward" copies into the kept .grad tensors
        cap.zero_grad(set_to_none=False)
        for d in range(3):
            torch._foreach_copy_(cap_grads, grads[2 * d])
            cap.perturb()
            torch._foreach_copy_(cap_grads, grads[2 * d + 1])
            cap.accumulate()
        cap.step()

    # PCGrad vs its twin: the same two backward passes over the same graph, then SGD.
    pc_p = _params()
    pc = PCGrad(pc_p, torch.optim.SGD, lr=1e-6, momentum=0.9)
    tw_p = _params()
    twin = torch.optim.SGD(tw_p, lr=1e-6, momentum=0.9, fused=True)
    cvec = [torch.randn(N, generator=g) for _ in range(2)]

    def losses(ps):
        flat = torch.cat(ps)  # one forward for both losses
        return [(flat * c).sum() for c in cvec]

    def pc_step():
        pc.zero_grad()
        pc.backward(losses(pc_p))
        pc.step()

    def twin_step():
        twin.zero_grad()
        ls = losses(tw_p)
        ls[0].backward(retain_graph=True)
        ls[1].backward()
        twin.step()

    from roga_cuda.ops.native import _C as C

    def always_checked(f):  # the same step with the overlap checks' memo off
        def g():
            prev = C._remember_overlaps(False)
            try:
                f()
            finally:
                C._remember_overlaps(prev)
        return g

    v = {"sgd_fused_step": base_step, "sam_step": sam_step, "roga_k3_step": roga_step,
         "roga_k3_step|capturable": roga_static_step,
         "pcgrad_k2_step": pc_step, "twin_k2_step": twin_step}
    if C is not None:
        v.update({"sam_step|always_checked": always_checked(sam_step),
                  "roga_k3_step|always_checked": always_checked(roga_step)})
    t = interleaved(v, reps=reps, warmup=10)
    out = {k: median(x) for k, x in t.items()}
    out["pcgrad_k2_surgery"] = out["pcgrad_k2_step"] - out["twin_k2_step"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res = {"machine": machine("cpu"), "tensors": N}
    res["primitives_s"] = primitives(a.reps)
    res["steps_s"] = st = steps(a.reps)
    print(f"# host cost, {N} one-element float32 tensors, CPU, interleaved medians ({res['machine']['date']}, "
          f"load {res['machine'].get('load_avg')})\n")
    print("| primitive | fast entry (us) | dispatcher (us) | roga_cuda.ops (us) | dispatcher / fast |")
    print("|---|---|---|---|---|")
    pr = res["primitives_s"]
    for op in ("norm", "perturb_", "restore_", "gram2", "combine2", "sgd_"):
        f, d, o = pr[f"{op}|fast"], pr[f"{op}|dispatcher"], pr[f"{op}|ops"]
        print(f"| {op} | {f * 1e6:.1f} | {d * 1e6:.1f} | {o * 1e6:.1f} | {d / f:.2f}x |")
    ref = st["sgd_fused_step"]
    print("\n| step | ms | x torch SGD(fused=True).step() | goal |\n|---|---|---|---|")
    goals = {"sam_step": "<= 1.0x", "roga_k3_step": "<= 2.0x", "pcgrad_k2_surgery": "<= 0.5x"}
    for k in ("sgd_fused_step", "sam_step", "roga_k3_step", "roga_k3_step|capturable", "pcgrad_k2_step",
              "twin_k2_step", "pcgrad_k2_surgery",
              "sam_step|always_checked", "roga_k3_step|always_checked"):
        if k in st:
            print(f"| {k} | {st[k] * 1e3:.3f} | {st[k] / ref:.2f}x | {goals.get(k, '')} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
