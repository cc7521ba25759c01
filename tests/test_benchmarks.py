"""The benchmark code itself: byte counts and the report machinery (no timing assertions)."""
import json
import os

import pytest
import torch

from benchmarks import lists as L
from benchmarks.timing import BYTES_PER_ELEMENT, op_bytes


def test_byte_counts_follow_the_reads_and_writes():
    # (reads, writes) of whole tensor lists per op, counted from the op's definition
    rw = {"norm": (1, 0), "norm_asam": (2, 0), "perturb_": (2, 2), "restore_": (1, 1),
          "restore_accumulate_": (3, 2), "gram2": (2, 0), "gram3": (3, 0), "combine2": (2, 1), "combine3": (3, 1)}
    for op, (r, w) in rw.items():
        assert op_bytes(op, 1000) == 4 * 1000 * (r + w), op
        assert op_bytes(op, 1000, element_size=2) == 2 * 1000 * (r + w), op
    assert BYTES_PER_ELEMENT["roga_cycle"] == sum(BYTES_PER_ELEMENT[o] for o in ("norm", "perturb_", "restore_accumulate_"))
    assert BYTES_PER_ELEMENT["pcgrad_pair"] == BYTES_PER_ELEMENT["gram2"] + BYTES_PER_ELEMENT["combine2"]
    # swap: norm + combine_(spare, [p, g]) + combine_(acc, [acc, h])
    assert BYTES_PER_ELEMENT["roga_cycle_swap"] == BYTES_PER_ELEMENT["norm"] + 2 * BYTES_PER_ELEMENT["combine2"]


def test_parameter_lists_match_the_architectures():
    r = L.resnet34_shapes()
    assert len(r) == 110 and L.numel(r) == 21_285_698  # torchvision resnet34 with a 2-class head
    a = L.aasist_shapes()
    assert len(a) == 400 and 250_000 < L.numel(a) < 350_000
    v = L.vit_b_shapes()
    assert 140 <= len(v) <= 160 and 80e6 < L.numel(v) < 90e6


def test_quick_run_writes_json_report_and_plots(tmp_path):
    from benchmarks.__main__ import run
    out = tmp_path / "bench"
    logs = []
    res = run("cpu", str(out), quick=True, skip={"e2e"}, log=logs.append)
    data = json.loads((out / "results.json").read_text())
    assert data["bandwidth"]["axpy"] > 0 and "tiny" in data["ops"]
    ops = data["ops"]["tiny"]["ops"]
    assert {"norm", "perturb_", "roga_cycle", "pcgrad_pair"} <= set(ops)
    assert "foreach" in ops["roga_cycle"] and "loop" in ops["roga_cycle"]
    md = (out / "report.md").read_text()
    assert "| roga_cycle | foreach |" in md and "RoGA cycle vs number of tensors" in md and "optimizer step" in md
    for p in res["plots"]:
        assert os.path.getsize(p) > 10_000
    assert {os.path.basename(p) for p in res["plots"]} == {"gbps_vs_size.png", "speedup.png", "tensor_count.png"}


def test_e2e_variants_run_on_tiny_inputs():
    from benchmarks import bench_e2e
    im = bench_e2e.image_variants("cpu", batch=2, size=32)
    sp = bench_e2e.speech_variants("cpu", batch=2, length=4000)
    for fn in list(im.values()) + list(sp.values()):
        fn()


def test_graph_benchmark_dry_run_takes_the_eager_steps():
    """bench_graphs without CUDA (direct calls in place of graphs): every variant runs, and
    the recorded RoGA calls step as the eager ones do (same parameters after the same steps)."""
    from benchmarks import bench_graphs, bench_optim
    res = bench_graphs.run("cpu", ["aasist"], reps=1, dry=True, log=lambda s: None)
    rows = res["lists"]["aasist"]["median_s"]
    assert set(rows) == {"base|sgd", "sam|eager", "sam|graph", "roga|default", "roga|eager", "roga|graph"}
    out = []
    for name in ("roga|eager", "roga|graph"):
        m = bench_optim.Model([(3, 4), (5,), (2, 2, 2)], torch.device("cpu"))
        setup, step = bench_graphs.variants(m, torch.device("cpu"), capture=False)[name]
        setup()
        step()
        out.append([p.detach().clone() for p in m.params])
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_layout_benchmark_times_both_layouts_on_tiny_inputs():
    from benchmarks import bench_layout
    threads = torch.get_num_threads()
    lines = []
    res = bench_layout.run(threads=1, reps=2, cases=[("img", bench_layout._image, (2, 32)),
                                                      ("speech", bench_layout._speech, (2, 1600))], log=lines.append)
    assert torch.get_num_threads() == threads  # restored
    assert set(res["cases"]) == {"img", "speech"} and len(lines) == 2
    for c in res["cases"].values():
        assert c["row-major"] > 0 and c["channels-last"] > 0 and c["speedup"] == pytest.approx(
            c["row-major"] / c["channels-last"])


def test_host_benchmark_runs_every_step_variant():
    from benchmarks import bench_host
    from roga_cuda.ops.native import _C
    st = bench_host.steps(reps=3)
    want = {"sgd_fused_step", "sam_step", "roga_k3_step", "pcgrad_k2_step", "twin_k2_step"}
    if _C is not None:
        want |= {"sam_step|always_checked", "roga_k3_step|always_checked"}
        assert _C._remember_overlaps(True)  # the knob was put back on
    assert want <= set(st) and all(st[k] > 0 for k in want)
