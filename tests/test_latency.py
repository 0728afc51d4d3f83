"""Latency as a budget: per-layer tables (measured, cached), the latency model the width solvers use, and the
loop and CLI that take `--target-latency`.

Deterministic checks run on an analytic table (a `LatencyTable` whose measurements are a formula of the layer's
widths), so the plumbing is tested exactly; the measuring itself is tested on real timings for what timings can
promise (positive, finite, cached, re-read), never for a speed."""

import json
import math
import os

import numpy as np
import pytest
import torch

from gpp_ext import models
from gpp_ext.latency import FRACTIONS, LatencyTable, LayerTable, _points
from gpp_ext.loop import LoopConfig
from gpp_ext.pruning import ChannelGraph, CostModel, LatencyModel, allocate, prune
from gpp_ext.pruning.costs import _cut_copy


class Analytic(LatencyTable):
    """Layers cost their FLOPs at 1 ms per MFLOP; the whole model its layers plus 0.5 ms fixed and 1 ms per
    million output activations of its layers (what `LatencyModel` must recover)."""

    def _window(self, layers, models):
        return ({k: self._layer(sig) for k, sig in layers.items()},
                {k: self.analytic(model, shape) for k, (model, shape) in models.items()})

    def _layer(self, sig):
        ins, outs = (_points(sig["in"]), _points(sig["out"]))
        spatial = math.prod(sig["spatial"]) if sig["op"] != "Linear" else 1
        kernel = math.prod(sig.get("kernel", [1]))
        return LayerTable(ins, outs, [[i * o * kernel * spatial * self.batch * 2e-6 for o in outs] for i in ins])

    def analytic(self, model, shape):
        example = torch.zeros(2, *shape)
        flops, activations = 0.0, 0.0
        graph = ChannelGraph(model, example)
        for node in graph.gm.graph.nodes:
            module = graph.modules.get(node.target) if node.op == "call_module" else None
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                out = node.meta["tensor_meta"].shape
                activations += math.prod(out[1:])
                w = module.weight
                flops += 2 * math.prod(w.shape) * (math.prod(out[2:]) if w.dim() == 4 else 1)
        return flops * self.batch * 1e-6 + 0.5 + activations * self.batch * 1e-6


def _vgg():
    torch.manual_seed(0)
    return models.build("vgg", in_channels=1, num_classes=10).eval()


def test_layer_table_interpolates_bilinearly_and_clamps():
    table = LayerTable([1, 4], [2, 6], [[1.0, 3.0], [4.0, 10.0]])
    assert table.ms(1, 2) == 1.0 and table.ms(4, 6) == 10.0
    assert table.ms(1, 4) == pytest.approx(2.0)
    assert table.ms(2.5, 4) == pytest.approx(0.5 * (2.0 + 7.0))
    assert table.ms(0, 0) == 1.0 and table.ms(99, 99) == 10.0  # clamped at the measured ends
    with pytest.raises(ValueError, match="finite"):
        LayerTable([1], [1, 2], [[1.0, float("nan")]])


def test_points_cover_the_fractions_and_the_full_width():
    assert _points(64) == sorted({4, 8, 16, 32, 48, 64})
    assert _points(3)[-1] == 3 and _points(3)[0] == 1
    assert len(_points(256)) == len(FRACTIONS)


def test_latency_model_recovers_the_analytic_latency_of_cut_models(tmp_path):
    model = _vgg()
    example = torch.zeros(2, 1, 28, 28)
    graph = ChannelGraph(model, example)
    table = Analytic("eager", batch=4, cache=tmp_path)
    latency = LatencyModel(graph, table)
    assert latency.cost({}) == pytest.approx(table.model_ms(model, (1, 28, 28)), rel=1e-9)
    constant, terms = latency.terms()
    widths = {g.name: max(1, g.size // 3) for g in graph.groups}
    assert constant + sum(f(widths) for _, f in terms) == pytest.approx(latency.cost(widths))
    # the prediction at widths that are not on the measured points, against the formula on a real cut;
    # tolerance: the table interpolates i*o bilinearly between points (exact along each axis, not between)
    for share in (1, 2, 3):
        widths = {g.name: max(1, g.size * share // 5) for g in graph.groups}
        real = table.analytic(_cut_copy(graph, widths), (1, 28, 28))
        assert latency.cost(widths) == pytest.approx(real, rel=0.05)
    assert latency._constant == pytest.approx(0.5, rel=1e-6)  # the fixed part, found from two timings


def test_a_latency_budget_is_met_and_spends_latency_where_it_is_cheap(tmp_path):
    model = _vgg()
    graph = ChannelGraph(model, torch.zeros(2, 1, 28, 28))
    table = Analytic("eager", batch=1, cache=tmp_path)
    latency = LatencyModel(graph, table)
    scores = {g.name: torch.linspace(1.0, 2.0, g.size, dtype=torch.float64) for g in graph.groups}
    widths = allocate(graph, scores, 0.3, "latency", "solver", latency=table)
    assert latency.cost(widths) <= 0.3 * latency.cost({}) * (1 + 1e-9)
    flops = allocate(graph, scores, 0.3, "flops", "solver")
    # the analytic latency is FLOPs plus activations: the two allocations differ, each meets its own budget
    assert CostModel(graph, "flops").cost(flops) <= 0.3 * CostModel(graph, "flops").cost({})
    assert widths != flops


def test_tables_are_cached_per_environment_and_a_bad_cache_is_measured_again(tmp_path):
    model = _vgg()
    graph = ChannelGraph(model, torch.zeros(2, 1, 28, 28))
    first = Analytic("eager", batch=1, cache=tmp_path)
    LatencyModel(graph, first)
    assert first.measured > 0 and os.path.exists(first.path)
    again = Analytic("eager", batch=1, cache=tmp_path)
    LatencyModel(graph, again)
    assert again.measured == 0  # every table and model read back
    other = Analytic("eager", batch=2, cache=tmp_path)
    assert other.path != first.path  # another batch size is another file
    with open(first.path, "w") as f:
        f.write("{not json")
    with pytest.warns(RuntimeWarning, match="cannot be used"):
        damaged = Analytic("eager", batch=1, cache=tmp_path)
    LatencyModel(graph, damaged)
    assert damaged.measured > 0
    data = json.loads(open(first.path).read())  # rewritten whole
    assert data["environment"]["batch"] == 1 and data["layers"]
    with open(first.path, "w") as f:
        json.dump({**data, "layers": {"x": {"ins": [1], "outs": [1], "ms": [["1; import os"]]}}}, f)
    with pytest.warns(RuntimeWarning, match="cannot be used"):
        Analytic("eager", batch=1, cache=tmp_path)


def test_real_measurements_are_positive_cached_and_cover_every_layer(tmp_path):
    model = models.build("lenet5", in_channels=1, num_classes=10, input_size=8).eval()
    graph = ChannelGraph(model, torch.zeros(2, 1, 8, 8))
    table = LatencyTable("eager", batch=1, cache=tmp_path, rounds=1, repeats=2)
    latency = LatencyModel(graph, table)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert table.measured == len(layers) + 2  # every layer's table, the model at full and at a quarter width
    assert latency.cost({}) > 0 and all(math.isfinite(v.grid.sum()) for v in table._layers.values())
    assert LatencyTable("eager", batch=1, cache=tmp_path).measured == 0


def test_onnxruntime_tables_build_their_layers_without_an_exporter(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    table = LatencyTable("onnxruntime", batch=2, cache=False, rounds=1, repeats=1)
    conv = table.layer(torch.nn.Conv2d(8, 16, 3, padding=1), (2, 8, 6, 6))
    linear = table.layer(torch.nn.Linear(32, 10), (2, 32))
    assert conv.grid.shape == (len(_points(8)), len(_points(16))) and (conv.grid > 0).all()
    assert linear.grid.shape == (len(_points(32)), len(_points(10)))


def test_bad_latency_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="runtime"):
        LatencyTable("tensorrt")
    with pytest.raises(ValueError, match="batch"):
        LatencyTable("eager", batch=0)
    with pytest.raises(ValueError, match="needs target_latency"):
        LoopConfig(budget_kind="latency").validate()
    with pytest.raises(ValueError, match="target_latency .* needs budget_kind='latency'"):
        LoopConfig(target_latency=0.5).validate()
    with pytest.raises(ValueError, match="latency_runtime"):
        LoopConfig(budget_kind="latency", target_latency=0.5, latency_runtime="gpu").validate()
    model = _vgg()
    with pytest.raises(ValueError, match="needs latency="):
        prune(model, [(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))], torch.zeros(2, 1, 28, 28),
              budget=0.5, budget_kind="latency")
    with pytest.raises(ValueError, match="ConvTranspose2d is not tabulated"):
        LatencyTable("eager", cache=False).layer(torch.nn.ConvTranspose2d(4, 4, 3), (1, 4, 5, 5))


def test_the_loop_meets_a_latency_target_and_reports_it(tmp_path, monkeypatch):
    from gpp_ext import data, latency, recipes
    from gpp_ext.loop import GrowPushPrune
    import gpp_ext.loop as loop_module  # the loop's own name for the table it uses

    monkeypatch.setenv("GPP_EXT_ONNX_LATENCY", "0")
    # every stage must see the same table: the loop's own name for it, and `gpp_ext.latency.table_for`, which the
    # push methods (the fade's widths) import when they run; patching only the loop's let the fade size its
    # widths on this machine's measured table and the test depend on the machine's speed
    def analytic(config, progress=False):
        return Analytic("eager", config.latency_batch, cache=tmp_path) if config.budget_kind == "latency" else None
    monkeypatch.setattr(loop_module, "latency_table", analytic)
    monkeypatch.setattr(latency, "table_for", analytic)
    splits = data.load_dataset("digits", seed=0)
    model = models.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    # the analytic 0.5 ms fixed part is most of this small model's latency: 85% is what widths can reach
    config = recipes.build("gpp", epochs=1, finetune_epochs=0.5, budget_kind="latency", target_latency=0.85,
                           accuracy_floor=0.9)
    report = GrowPushPrune(model, splits, config, out_dir=tmp_path / "run", progress=False).run()
    base, final = report["base"], report["final"]
    assert final["latency"] <= 0.85 * base["latency"] * (1 + 1e-9) and report["target_reached"]
    assert final["params"] < base["params"]


def test_cli_target_latency_sets_the_latency_budget():
    from gpp_ext import cli

    parser = cli._parser()
    args = parser.parse_args(["compress", "--target-latency", "0.4", "--latency-runtime", "onnxruntime",
                              "--latency-batch", "8"])
    config = cli._config(args, "lenet5")
    assert (config.budget_kind, config.target_latency, config.latency_runtime, config.latency_batch) == \
        ("latency", 0.4, "onnxruntime", 8)
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "--target-latency", "1.5"])


def test_measured_tables_are_monotone_in_both_widths():
    # a timing inflated at (2, 2) by a busy moment, and one at the full widths
    table = LayerTable.measured([1, 2, 4], [1, 2, 4], [[1.0, 2.0, 3.0], [2.0, 9.0, 5.0], [3.0, 5.0, 8.0]])
    g = table.grid
    assert g[1, 1] == 5.0  # no slower than a point with more channels
    assert (np.diff(g, axis=0) >= 0).all() and (np.diff(g, axis=1) >= 0).all()
    assert g[2, 2] == 8.0 and g[0, 0] == 1.0
