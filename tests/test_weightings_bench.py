"""benchmarks/bench_aggregators.py runs (tiny sizes, one rep; no timing assertions)."""
import pytest
import torch

from benchmarks import bench_aggregators as B


def test_problem_gradients_are_the_signed_tensors():
    prob = B.Problem(B.QUICK_SHAPES, 3, "cpu")
    losses = prob.forward()
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, prob.params, retain_graph=True)
        for j, (g, r) in enumerate(zip(grads, prob.R)):
            assert torch.equal(g, prob.S[k, j] * r)


def test_quick_run_has_the_reference_rows():
    logs = []
    res = B.run("cpu", "quick", ks=(2,), methods=("pcgrad", "mgda"), reps=1, log=logs.append)
    rows = res["results"][2]["median_s"]
    assert {"twin", "sum", "roga|pcgrad", "roga|mgda"} <= set(rows)
    assert all(t > 0 for t in rows.values())
    assert "| twin |" in "\n".join(logs)


def test_unknown_methods_are_skipped_not_fatal():
    logs = []
    out = B.variants(B.Problem(B.QUICK_SHAPES, 2, "cpu"), ["no_such_method"], log=logs.append)
    assert "roga|no_such_method" not in out and any("roga|no_such_method" in line for line in logs)


def test_peers_agree_with_roga_on_pcgrad_for_two_tasks():
    """Sanity of the comparison: for K = 2 (no random order) every PCGrad implementation
    takes the same step."""
    pytest.importorskip("torchjd")
    pytest.importorskip("pytorch_optimizer")
    after = {}
    for name in ("roga|pcgrad", "torchjd-autojac|pcgrad", "pytorch-optimizer|pcgrad"):
        prob = B.Problem(B.QUICK_SHAPES, 2, "cpu")
        setup, step = B.variants(prob, ["pcgrad"], log=lambda *_: None)[name]
        setup()
        step()
        after[name] = torch.cat([p.detach().flatten() for p in prob.params])
    ref = after["roga|pcgrad"]
    for name, v in after.items():
        assert torch.allclose(v, ref, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("method", ["pcgrad", "mgda"])
def test_fold_path_takes_the_step_backward_and_step_take(method):
    """roga-fold|<method> (--fold-path): step(closure) folds the combination into the update;
    the parameters after two steps are those of backward(losses) + step()."""
    after = {}
    for name in (f"roga|{method}", f"roga-fold|{method}"):
        prob = B.Problem(B.QUICK_SHAPES, 2, "cpu")
        setup, step = B.variants(prob, [method], log=lambda *_: None, paths=("roga-fold",))[name]
        for _ in range(2):
            setup()
            step()
        after[name] = torch.cat([p.detach().flatten() for p in prob.params])
    assert not torch.equal(after[f"roga|{method}"], torch.cat([p.flatten() for p in B.Problem(B.QUICK_SHAPES, 2,
                                                                                               "cpu").params]))
    torch.testing.assert_close(after[f"roga-fold|{method}"], after[f"roga|{method}"], rtol=1e-6, atol=1e-7)


def test_isolated_run_times_each_variant_in_its_own_process():
    """--isolated: one process per variant and round; the ratio is the median of the
    same-round ratios (the twin's is 1 exactly)."""
    logs = []
    res = B.run_isolated("cpu", "quick", ks=(2,), methods=("pcgrad",), reps=1, rounds=2, log=logs.append,
                         only=("roga", "roga-fold"), paths=("roga-fold",))
    r = res["results"][2]
    names = {"twin", "roga|pcgrad", "roga-fold|pcgrad"}  # (the fold kind reaches the child processes)
    assert set(r["median_s"]) == names and len(r["per_round_s"]) == 2
    assert r["vs_twin"]["twin"] == 1.0 and r["vs_twin"]["roga|pcgrad"] > 0
    assert all(set(g) == names for g in r["per_round_s"])
    assert "2 processes x 1 reps" in "\n".join(logs)


def test_training_loop_benchmark_runs_every_variant():
    """benchmarks/bench_aggregator_loop.py --quick: the twin, kept and fresh variants each in
    their own process; tiny tensors, so the default keeps no sets (the "kept" variant is the
    default, whatever it chooses)."""
    from benchmarks import bench_aggregator_loop as BL
    logs = []
    res = BL.run(ks=(2,), width=16, layers=1, batch=4, reps=1, rounds=1, log=logs.append)
    r = res["results"][2]
    assert set(r["median_s"]) == {"twin", "kept", "fresh"} and r["vs_twin"]["twin"] == 1.0
    assert r["kept_used"] is False  # 16 x 16 weights average far below 128 KiB
    assert all(t > 0 for t in r["median_s"].values()) and "| kept |" in "\n".join(logs)


@pytest.mark.slow
def test_peak_memory_counts_what_a_variant_keeps_between_steps():
    """--memory on the ResNet-34 list (P = 85 MB): the baseline is taken before the first
    step, so our kept task-gradient sets (K P, kept between steps) count, as does the twin's
    one gradient set; memory the allocator keeps for reuse does not (it once hid a whole P)."""
    out = B.memory({2: ["twin", "roga|pcgrad"]}, "cpu", "resnet34", ks=(2,), log=lambda *_: None)[2]
    assert 0.9 < out["twin"] < 1.5, out
    assert 1.95 < out["roga|pcgrad"] < 2.5, out
