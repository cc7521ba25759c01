"""The K = 8 step by phase: bench_aggregators' twin and roga variants interleaved, with our
native gram / combine_ / sgd_ and each autograd pass timed, and minor page faults per step.
    PYTHONPATH=. python benchmarks/results/cpu-2026-12-02/k8_step_phases_fold.py 8 (the eleventh session's script with the fold variants)"""
import time, torch, statistics, resource, sys
from benchmarks import bench_aggregators as BA, lists as L, timing
import roga_cuda.ops.native as N
torch.set_num_threads(2)
K = int(sys.argv[1]) if len(sys.argv) > 1 else 8
prob = BA.Problem(L.resnet34_shapes(), K, "cpu")
v = BA.variants(prob, ["pcgrad", "mgda"], log=lambda *_: None, paths=("roga-fold",))
v = {k: v[k] for k in ("twin", "roga|pcgrad", "roga-fold|pcgrad", "roga|mgda", "roga-fold|mgda")}
T = {}
cur = [None]
def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        t0 = time.perf_counter(); r = f(*a, **k); T.setdefault((cur[0], name), []).append(time.perf_counter() - t0); return r
    setattr(mod, name, g)
for n in ["gram", "combine_", "sgd_"]: wrap(N, n)
ab = torch.autograd.backward
def tb(*a, **k):
    t0 = time.perf_counter(); r = ab(*a, **k); T.setdefault((cur[0], "pass"), []).append(time.perf_counter() - t0); return r
torch.autograd.backward = tb
torch.Tensor.backward_orig = torch.Tensor.backward
def tensor_backward(self, *a, **k):
    t0 = time.perf_counter(); r = torch.Tensor.backward_orig(self, *a, **k); T.setdefault((cur[0], "pass"), []).append(time.perf_counter() - t0); return r
torch.Tensor.backward = tensor_backward
F = {}
def mk(name, fn):
    setup, step = fn
    def s():
        cur[0] = name; f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; step()
        F.setdefault(name, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return (setup, s)
r = timing.interleaved({k: mk(k, fn) for k, fn in v.items()}, reps=20)
for k, t in r.items(): print(k, "%.1f ms" % (timing.median(t) * 1e3), "faults/step %d" % statistics.median(F[k]))
for (var, n), t in sorted(T.items()):
    per = len(t) / (len(r[var]) + 3)
    print("  ", var, n, "%.2f ms x %.0f per step" % (statistics.median(t) * 1e3, per))
