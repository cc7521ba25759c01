"""One process of the gram A/B (eleventh session): gram over K = 2..16 copies of the ResNet-34
list and a streaming axpy, interleaved; prints ms and % of stream. Run from the repository root
with PYTHONPATH set to the build under test, alternating builds process by process."""
import torch, json
from benchmarks import lists, timing
import roga_cuda.ops as O
torch.set_num_threads(2)
sh = lists.resnet34_shapes()
n = lists.numel(sh)
gs = [lists.make(sh, seed=i) for i in range(16)]
a = torch.randn(64 * 2**20); b = torch.randn(64 * 2**20)
v = {f"gram{k}": (lambda k=k: O.gram(gs[:k], backend="cpu")) for k in (2, 3, 4, 5, 8, 16)}
v["axpy"] = lambda: a.add_(b, alpha=1e-3)
r = timing.interleaved(v, reps=12)
ms = {k: timing.median(t) * 1e3 for k, t in r.items()}
stream = 12 * a.numel() / (ms["axpy"] / 1e3) / 1e9
out = {"stream_GBs": round(stream, 1)}
for k in (2, 3, 4, 5, 8, 16):
    out[f"gram{k}_ms"] = round(ms[f"gram{k}"], 2)
    out[f"gram{k}_pct"] = round(100 * 4 * k * n / (ms[f"gram{k}"] / 1e3) / 1e9 / stream)
print(json.dumps(out))
