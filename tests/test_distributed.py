"""Distributed analysis (issue 7): statistics combined across processes equal the single-process statistics.

Two processes on 127.0.0.1 with the gloo backend, spawned by the test (`gpp_ext.testing.run_processes`, which
kills them after a time limit). Tolerance 1e-10 relative: the combination is exact algebra, and its round-off
(sums of float64 class sums and of re-centred scatters) is a few ulps of the entries, ~1e-15 relative; 1e-10
leaves room for the different summation order of a blocked Gram product without hiding a missing term, which
would be O(1) wrong.
"""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gpp_ext import ops
from gpp_ext.analysis import DiscriminantAnalyzer
from gpp_ext.distributed import ShardSampler, all_reduce_scatter, shard_loader
from gpp_ext.stats import ScatterStats
from gpp_ext.testing import make_features, rel_err, run_processes

C, D = 6, 24


def uneven_parts(mean=0.0):
    """1003 samples split 640 / 363; class 3 appears only in rank 0's part."""
    x, y = make_features(1003, D, C, mean=mean, dtype=torch.float64, seed=3)
    order = torch.argsort((y == 3).double(), descending=True, stable=True)  # every class-3 sample first
    x, y = x[order], y[order]
    return (x[:640], y[:640]), (x[640:], y[640:]), (x, y)


def _scatter_worker(rank, world, out, mean):
    parts = uneven_parts(mean)
    x, y = parts[rank]
    if rank == 1:
        assert not (y == 3).any()
    combined = all_reduce_scatter(ops.class_scatter(x, y, C))
    torch.save(combined.state_dict(), out / f"rank{rank}.pt")


def assert_stats_close(got: ScatterStats, want: ScatterStats, tol: float) -> None:
    assert torch.equal(got.count, want.count)
    assert rel_err(got.mean, want.mean) < tol
    assert rel_err(got.within, want.within) < tol


@pytest.mark.parametrize("mean", [0.0, 1e4], ids=["centred", "mean 1e4"])
def test_all_reduce_scatter_equals_one_process(tmp_path, mean):
    run_processes(_scatter_worker, 2, tmp_path, mean)
    x, y = uneven_parts(mean)[2]
    want = ops.class_scatter(x, y, C)
    ranks = [ScatterStats.from_state_dict(torch.load(tmp_path / f"rank{r}.pt", weights_only=True)) for r in (0, 1)]
    for got in ranks:
        assert_stats_close(got, want, 1e-10)
    for a, b in zip(ranks[0].state_dict().values(), ranks[1].state_dict().values()):
        assert torch.equal(a, b)  # bit-identical on every rank: identical decisions downstream


def _mismatch_worker(rank, world, out):
    stats = ScatterStats.empty(C, D + rank)
    try:
        all_reduce_scatter(stats)
    except ValueError as e:
        (out / f"rank{rank}.txt").write_text(str(e))


def test_all_reduce_scatter_refuses_different_shapes(tmp_path):
    run_processes(_mismatch_worker, 2, tmp_path)
    for r in (0, 1):
        assert "same shape" in (tmp_path / f"rank{r}.txt").read_text()


def _abort_worker(rank, world, out, when):
    import atexit
    import os
    import signal

    (out / f"rank{rank}.txt").write_text("worked")
    if rank == 0 and when == "in teardown":
        atexit.register(os.kill, os.getpid(), signal.SIGABRT)  # dies after the barrier and the group are gone
    elif rank == 0:
        os.kill(os.getpid(), signal.SIGABRT)


def test_run_processes_tells_a_teardown_abort_from_a_crash(tmp_path):
    """gloo can abort a process while it leaves the group after all the work is done: that warns. A process
    killed before every rank finished still fails the caller."""
    from torch.multiprocessing import ProcessExitedException

    with pytest.warns(RuntimeWarning, match="rank 0 died of SIGABRT while leaving"):
        run_processes(_abort_worker, 2, tmp_path, "in teardown")
    assert all((tmp_path / f"rank{r}.txt").read_text() == "worked" for r in (0, 1))
    with pytest.raises(ProcessExitedException, match="SIGABRT"):
        run_processes(_abort_worker, 2, tmp_path, "at work")


def test_without_a_process_group_it_is_the_identity():
    stats = ops.class_scatter(*make_features(50, 4, 3, dtype=torch.float64), 3)
    assert all_reduce_scatter(stats) is stats
    with pytest.raises(TypeError, match="ScatterStats"):
        all_reduce_scatter({"count": stats.count})


def test_shard_sampler_covers_every_sample_once():
    data = list(range(11))
    shards = [list(ShardSampler(data, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == data
    assert [len(ShardSampler(data, 3, r)) for r in range(3)] == [4, 4, 3]
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(data, 2, 2)
    data = TensorDataset(torch.arange(5.0).unsqueeze(1))
    loader = DataLoader(data, batch_size=2, shuffle=True)
    sharded = shard_loader(loader)
    assert isinstance(sharded.sampler, ShardSampler) and sharded.batch_size == 2
    spelled_out = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data), 2, drop_last=True)
    assert shard_loader(DataLoader(data, batch_sampler=spelled_out)).drop_last
    assert shard_loader(sharded) is sharded
    balanced = [[0, 1], [2, 3]]  # any other batch sampler: the caller must split the data itself
    assert shard_loader(DataLoader(data, batch_sampler=balanced)) is None and shard_loader(iter([])) is None


def test_a_shuffling_loaders_shards_are_one_seeded_permutation_not_the_stored_order():
    """A data set stored class by class, analysed for a few batches per rank: the shards of a shuffling loader
    take one permutation (the same on every rank, so still every sample once), so the first batches hold every
    class, as a single process's shuffled batches would; a sequential loader keeps its order."""
    labels = torch.arange(10).repeat_interleave(30)   # 300 samples, class by class
    data = TensorDataset(torch.randn(300, 2), labels)
    shards = [list(ShardSampler(data, 2, r, shuffle_seed=0)) for r in range(2)]
    assert sorted(sum(shards, [])) == list(range(300)) and shards == [list(ShardSampler(data, 2, r, shuffle_seed=0))
                                                                      for r in range(2)]
    first = next(iter(shard_loader(DataLoader(data, batch_size=32, shuffle=True))))[1]
    assert len(first.unique()) >= 6   # not the first class or two of the stored order
    ordered = next(iter(shard_loader(DataLoader(data, batch_size=32))))[1]
    assert ordered.unique().tolist() == [0, 1]   # (one process here: the first 32 samples)


class _Net(torch.nn.Module):
    """float64, so that the features do not depend on how the samples are batched (a float32 GEMM's rounding
    does, by ~1e-7, and the processes batch differently from one process)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
        self.classifier = torch.nn.Linear(32, 10)
        self.double()

    def forward(self, x):
        return self.classifier(self.body(x))


def _digits_loader():
    from gpp_ext.data import digits

    data = digits()
    x, y = data.tensors
    return DataLoader(TensorDataset(x.flatten(1).double(), y), batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def _analyzer_worker(rank, world, out):
    model = _Net()
    with DiscriminantAnalyzer(model, 10, layers=["body", "classifier:input"]) as analyzer:
        analyzer.run(_digits_loader(), progress=False)
        torch.save({"state": analyzer.state_dict(), "lda": analyzer.utility(kind="lda")}, out / f"rank{rank}.pt")


def test_analyzer_run_is_exact_across_processes(tmp_path):
    run_processes(_analyzer_worker, 2, tmp_path)
    with DiscriminantAnalyzer(_Net(), 10, layers=["body", "classifier:input"]) as analyzer:
        analyzer.run(_digits_loader(), progress=False)
        want = analyzer.state_dict()
        lda = analyzer.utility(kind="lda")
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["state"]["num_samples"] == want["num_samples"] == 1797
        for name, stats in want["layers"].items():
            assert_stats_close(ScatterStats.from_state_dict(got["state"]["layers"][name]),
                               ScatterStats.from_state_dict(stats), 1e-10)
        assert rel_err(got["lda"], lda) < 1e-8  # an eigen-solve of the same matrices, conditioned ~1e2


class _Stop(Exception):
    pass


def _fit_checkpoint_worker(rank, world, out):
    """Each rank in its own folder, as on two machines: only rank 0 writes (and so holds) the checkpoint."""
    import os

    from gpp_ext.training import fit

    os.chdir(out / f"machine{rank}")
    data = TensorDataset(torch.randn(96, 6, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 3)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def stop(step, total):
        if step == 4:   # the first step of the second epoch (3 steps of 32 per epoch): after epoch 1's save
            raise _Stop

    try:
        fit(model(), data, 2, batch_size=32, seed=0, after_step=stop, checkpoint="fit.pt")
    except _Stop:
        pass
    steps = []
    trained = fit(model(), data, 2, batch_size=32, seed=0, after_step=lambda s, t: steps.append(s),
                  checkpoint="fit.pt")
    torch.save({"steps": steps, "state": trained.state_dict()}, out / f"rank{rank}.pt")


def test_fit_resumes_on_every_rank_from_rank_0s_checkpoint(tmp_path):
    """Without the shared read, the rank that cannot see the file starts over: unequal step counts, a hung DDP."""
    for rank in (0, 1):
        (tmp_path / f"machine{rank}").mkdir()
    run_processes(_fit_checkpoint_worker, 2, tmp_path, timeout=90)
    assert (tmp_path / "machine0" / "fit.pt").exists() and not (tmp_path / "machine1" / "fit.pt").exists()
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert got[0]["steps"] == got[1]["steps"] == [4, 5, 6]   # both went on after the saved epoch
    assert all(torch.equal(got[0]["state"][k], got[1]["state"][k]) for k in got[0]["state"])


def _latency_worker(rank, world, out):
    from gpp_ext.latency import LatencyTable

    table = LatencyTable("eager", batch=1, cache=False, rounds=1, repeats=2)
    layer = table.layer(torch.nn.Linear(32, 16), (1, 32))
    torch.save({"layer": layer.to_dict(), "measured": table.measured}, out / f"rank{rank}.pt")


def test_every_rank_holds_rank_0s_latency_table():
    """Timed on each process, the tables differed by the noise of the clock, and so could the widths decided
    from them; rank 0 measures and shares."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        run_processes(_latency_worker, 2, Path(folder), timeout=90)
        got = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert got[0]["layer"] == got[1]["layer"] and got[0]["measured"] == got[1]["measured"] == 1


# ------------------------------------------------------------------------------------ the loop under torchrun

# One push-prune-fine-tune iteration. Later iterations can differ by a channel or two: float32 GEMMs round
# differently for other batch shapes (~1e-7), and training amplifies that (a DDP step itself has the
# one-process gradient: test_ddp_step_has_the_gradient_of_one_process).
# A constant learning rate: the comparison is of one process against two, and 60 one-cycle steps leave LeNet-5 on
# digits in a regime where rounding differences after the cut grow to several points (base accuracies match).
# The push is pinned to the plain one. With either push, float-level differences between one and two processes
# can flip a channel the cut keeps (measured, plain push: validation accuracy right after the cut 0.2517 with one
# process, 0.2378 with two; the same accuracy at the end of the push). The final test accuracy then differed by
# 0.006 with the plain push and by 0.025 with the fade, so the 0.02 check below holds for the plain push only.
COMPRESS = ["compress", "--model", "lenet5", "--data", "digits", "--epochs", "3", "--push", "none", "--push-epochs",
            "1", "--finetune-epochs", "1", "--max-iterations", "1", "--batch-size", "64", "--target-params", "0.3",
            "--lr-schedule", "constant", "--lr", "2e-3", "--seed", "3", "--quiet"]


def _widths(out):
    import json

    report = json.loads((out / "report.json").read_text())
    return [it["widths"] for it in report["iterations"]], report


def test_torchrun_two_processes_prune_like_one(tmp_path):
    """`torchrun --nproc-per-node 2 -m gpp_ext.cli compress` on CPU (gloo) cuts the same channels as one
    process with the same seed and global batch, writes one set of outputs, and resumes from them."""
    import os
    import subprocess
    import sys

    from gpp_ext import cli
    from gpp_ext.testing import free_port

    one = tmp_path / "one"
    assert cli.main(COMPRESS + ["--out", str(one)]) == 0
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "gpp_ext.cli"] + COMPRESS + ["--out", str(two)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cannot split" not in done.stderr  # the analysis was split over the processes
    assert done.stdout.count("gpp: lenet5 on digits") == 1 and "2 processes" in done.stdout  # rank 0 speaks
    widths_one, report_one = _widths(one)
    widths_two, report_two = _widths(two)
    assert len(widths_one) >= 1 and widths_two == widths_one
    assert report_two["final"]["params"] == report_one["final"]["params"]
    assert abs(report_two["final"]["test_accuracy"] - report_one["final"]["test_accuracy"]) < 0.02
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # resuming a finished run under torchrun: rank 0 reads the checkpoint and shares it, nothing is redone
    command[command.index("--master-port") + 1] = str(free_port())
    again = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _widths(two)[0] == widths_two


def _gradients(push: bool, batch: int):
    """Gradients of one training step of the loop on digits: on one process, or this process's under DDP."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from gpp_ext import data, distributed, models
    from gpp_ext.loop import stage_seed
    from gpp_ext.push import PreDecisionTap, PushLoss
    from gpp_ext.training import training_batches

    splits = data.load_dataset("digits", seed=3)
    torch.manual_seed(3)
    model = models.build("lenet5", in_channels=1, num_classes=10, input_size=8).double()
    net = DistributedDataParallel(model) if distributed.is_distributed() else model
    x, y = next(iter(training_batches(splits.train, batch, stage_seed(3, 1), balanced=push, sliced=True)))
    with PreDecisionTap(model) as tap:
        logits = net(x.double())
        if push:
            loss = PushLoss(10, alpha=1.0, beta=1.0, gamma=0.1)(logits, tap.features, y)
        else:
            loss = F.cross_entropy(logits, y, reduction="sum") * distributed.loss_scale(y.shape[0])
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, y.shape[0]


def _gradient_worker(rank, world, out, batch):
    torch.save([_gradients(False, batch), _gradients(True, batch)], out / f"rank{rank}.pt")


@pytest.mark.parametrize("batch", [64, 15], ids=["even", "odd global batch"])
def test_ddp_step_has_the_gradient_of_one_process(tmp_path, batch):
    """The loop's DDP step (rank-sliced batches, sum-reduced cross-entropy scaled by `loss_scale`, push
    statistics on the gathered batch) gives the gradient one process computes on the whole global batch.
    float64, so the only difference is summation order: 1e-10 relative."""
    run_processes(_gradient_worker, 2, tmp_path, batch)
    want = [_gradients(False, batch), _gradients(True, batch)]
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for (grads, n), (one, total) in zip(got[0], want):
        assert n in (total // 2, total - total // 2)
        for name in one:
            assert rel_err(grads[name], one[name]) < 1e-10, name
    for a, b in zip(got[0], got[1]):
        assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])  # DDP leaves the same gradient everywhere


def test_rank_sliced_batches_partition_each_batch():
    from gpp_ext.distributed import RankSlicedBatchSampler

    batches = [[0, 1, 2, 3, 4], [5, 6], [7]]
    parts = [list(RankSlicedBatchSampler(batches, 2, r)) for r in (0, 1)]
    assert parts == [[[0, 2, 4], [5]], [[1, 3], [6]]]  # the one-item batch is skipped by both
