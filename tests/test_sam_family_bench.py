"""benchmarks/bench_sam_family.py runs every code path (``--quick``: tiny inputs; no timing
is checked here)."""
import torch

from benchmarks import bench_sam_family as B


def test_quick_run_reports_every_variant():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        logs = []
        res = B.run("cpu", quick=True, k=3, reps=1, log=logs.append)
    finally:
        torch.set_num_threads(n)
    med = res["overhead"]["tiny"]["median_s"]
    assert {f"{v}|roga_cuda" for v in B.VARIANTS} <= set(med)
    if B._peer() is not None:
        assert {f"{v}|pytorch-optimizer" for v in B.VARIANTS} <= set(med)
    assert set(res["reuse"]["median_step_s"]) == {"sam", "sam_interval3", "looksam3", "base"}
    assert res["reuse"]["ideal_ratio"] == (1 + 1 / 3) / 2
    text = "\n".join(logs)
    assert "| looksam |" in text and "ideal ratio vs SAM" in text
