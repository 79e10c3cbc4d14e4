"""The bench harness without the command line: grid, shards, row files, settings, the
protocol of each stage (with recording stand-in methods), and what a row measures.

Training here runs on 200 synthetic images (two mini-batches of 100) for a few epochs:
the protocols' calls and epoch counts are checked, not accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import filelock
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

import bayessparse as bs
from bayessparse.bench import (
    COLUMNS,
    Bench,
    Item,
    SettingsMismatch,
    check_budget,
    claim,
    grid,
    merge,
    min_budget,
    parse_shard,
    read_rows,
    run_grid,
    shard,
)
from bayessparse.bench.measure import architecture, measure
from bayessparse.bench.plots import seed_means
from bayessparse.bench.runner import RowFailed, reinit_seed, round_epochs
from bayessparse.bench.store import RESULTS, row_path, to_csv, to_markdown, write_row
from bayessparse.cli import main
from bayessparse.data import Split
from bayessparse.pruning import prunable_layers, reinit_
from bayessparse.pruning.magnitude import Magnitude

# --- grid and shards --------------------------------------------------------------------


def test_grid_sorts_dense_then_bayesian_then_pruning_and_gives_dense_one_row_per_seed():
    items = grid("lenet5", ["random", "magnitude", "l0", "dense", "random"], [0.9, 0.5], [1, 0])
    names = [(i.method, i.sparsity, i.seed) for i in items]
    assert names == [
        ("dense", 0.0, 0),
        ("dense", 0.0, 1),
        ("l0", 0.0, 0),  # a Bayesian family's own threshold
        ("l0", 0.0, 1),
        *[
            (m, s, seed)
            for m in ("l0", "magnitude", "random")
            for s in (0.5, 0.9)
            for seed in (0, 1)
        ],
    ]
    assert {i.model for i in items} == {"lenet5"}
    assert items[4].name == "lenet5-l0-0.5-0"


def test_grid_refuses_an_unknown_method_listing_the_names():
    with pytest.raises(ValueError, match=r"Unknown method 'obd2'.*dense, group_nj.*magnitude"):
        grid("lenet300", ["obd2"], [0.9], [0])


def test_shards_partition_the_grid_by_index_mod_n():
    items = grid("lenet300", ["dense", "magnitude", "random"], [0.5, 0.9, 0.99], [0, 1, 2])
    parts = [shard(items, i, 3) for i in range(3)]
    assert [len(p) for p in parts] == [7, 7, 7]  # 3 + 18 rows
    assert parts[1] == [items[i] for i in range(1, 21, 3)]
    assert sorted((item for part in parts for item in part), key=items.index) == items


@pytest.mark.parametrize("text", ["2/2", "-1/2", "0/0", "a/2", "1", "1/2/3", ""])
def test_parse_shard_refuses_anything_but_i_over_n_with_i_below_n(text):
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard(text)


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard("3/4") == (3, 4)


# --- budget splits ----------------------------------------------------------------------


class FakeIterative(Magnitude):
    """Magnitude pruning in 3 rounds, rewinding: an after-training method with rounds."""

    name = "fake_iterative"
    rounds = 3
    policy = "rewind"


def test_round_epochs_split_the_budget_after_pretraining_remainder_last():
    # Budget 11: pretraining 5, then 6 epochs over 4 rounds: 1, 1, 1, 3.
    assert round_epochs(11, 4) == [1, 1, 1, 3]
    assert round_epochs(2, 1) == [1]
    assert round_epochs(9, 5) == [1, 1, 1, 1, 1]


def test_min_budget_and_check_budget():
    assert min_budget("dense") == min_budget("sparse_vd") == 1
    assert min_budget("magnitude") == 2  # one epoch of pretraining, one of fine-tuning
    with pytest.raises(ValueError, match="at least 2 epochs for method 'magnitude'.*got 1"):
        check_budget(["dense", "magnitude"], 1)
    check_budget(["dense", "magnitude"], 2)


# --- row files, CSV, settings -------------------------------------------------------------


def row(item: Item, error: float) -> dict[str, Any]:
    return {column: None for column in COLUMNS} | item._asdict() | {"error": error}


def test_rows_merge_into_a_csv_in_grid_order_whatever_the_order_they_finished(tmp_path):
    items = grid("lenet300", ["magnitude", "dense"], [0.9, 0.5], [0])
    for n, item in enumerate(reversed(items)):
        write_row(tmp_path, item, row(item, error=n / 10))
    (tmp_path / "rows" / ".x.json.123.tmp").write_text("{")  # a killed writer's leftover
    rows = merge(tmp_path)
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        ("dense", 0.0),
        ("magnitude", 0.5),
        ("magnitude", 0.9),
    ]
    text = (tmp_path / RESULTS).read_text()
    lines = text.splitlines()
    assert lines[0] == ",".join(COLUMNS)
    # Floats are written exactly (repr); nulls (non-finite values) as empty cells.
    assert lines[1].startswith("lenet300,dense,0.0,0,,,,0.2,,")
    assert text == to_csv(read_rows(tmp_path))
    assert json.loads(row_path(tmp_path, items[0]).read_text())["error"] == 0.2


def test_claim_records_the_settings_then_refuses_others_naming_each_difference(tmp_path):
    settings = {"model": "lenet300", "budget": 4, "lr": 0.001, "data": "ab" * 32}
    claim(tmp_path / "b", settings)
    claim(tmp_path / "b", dict(settings))  # the same settings: welcome
    other = settings | {"budget": 5, "data": "cd" * 32}
    with pytest.raises(SettingsMismatch) as err:
        claim(tmp_path / "b", other)
    # Fingerprints are shown by their first 12 digits.
    assert "(budget 4 there, 5 here; data abababababab... there, cdcdcdcdcdcd... here)" in str(
        err.value
    )
    assert json.loads((tmp_path / "b" / "bench.json").read_text()) == settings


# --- what a row measures ----------------------------------------------------------------


def pruned_mlp() -> nn.Sequential:
    """Linear(4, 3) -> ReLU -> Linear(3, 2), weights 1, biases 0.5; the first layer's
    input 0 and unit 2 pruned: 6 of its 12 weights kept, all 6 of the second's."""
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.fill_(1.0)
            layer.bias.fill_(0.5)
    mask = torch.ones(3, 4)
    mask[:, 0] = 0
    mask[2, :] = 0
    torch_prune.custom_from_mask(net[0], "weight", mask)
    return net


def test_measure_counts_weights_flops_units_and_compacted_parameters():
    net, dense = pruned_mlp(), nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    images, labels = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(5)
    m = measure(net, dense, images, labels.long())
    assert (m["weights"], m["nonzero"]) == (18, 12)
    assert m["achieved_sparsity"] == pytest.approx(1 / 3, rel=1e-15)
    assert m["compression"] == 1.5
    assert (m["flops_dense"], m["flops_nonzero"]) == (18, 12)  # one MAC per weight per example
    # The compacted net's units: 3 pixels in, then 2 hidden units (unit 2, a constant
    # relu(0.5), is folded into the next layer's bias).
    assert m["architecture"] == "3-2"
    assert m["params"] == 12 + 3 + 6 + 2
    # Compacted: input 0 dropped (Select), unit 2 folded into the next bias: 3*2+2 + 2*2+2.
    assert m["compact_params"] == 14
    assert m["error"] == 0.0  # all-ones weights score class 0 and 1 alike: argmax picks 0
    assert math.isfinite(m["speedup"]) and m["speedup"] > 0


def test_architecture_counts_conv_output_channels_then_linear_inputs():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4, 5))
    with torch.no_grad():
        net[0].weight[1:3] = 0  # two closed channels
        net[2].weight[:, :7] = 0  # seven dead inputs
    assert architecture(net) == "2-9"


def test_seed_means_average_each_method_and_sparsity_over_seeds():
    rows = [
        {"method": "dense", "sparsity": 0.0, "compression": 1.0, "error": 0.1},
        {"method": "m", "sparsity": 0.5, "compression": 2.0, "error": 0.2},
        {"method": "m", "sparsity": 0.5, "compression": 2.2, "error": 0.4},
        {"method": "m", "sparsity": 0.9, "compression": 10.0, "error": 0.5},
        {"method": "m", "sparsity": 0.99, "compression": None, "error": 0.9},  # all pruned
    ]
    means = seed_means(rows, "error")
    assert list(means) == ["m"]
    assert means["m"] == [(pytest.approx(2.1), pytest.approx(0.3)), (10.0, 0.5)]


def test_reinit_seed_differs_from_the_seed_in_the_low_32_bits():
    # torch's CPU generator keeps the low 32 bits: seed + 2**32 would draw the init again.
    seeds = [reinit_seed(s) for s in range(100)]
    assert all(0 <= r < 2**32 and r != s for s, r in enumerate(seeds))
    assert len(set(seeds)) == 100


# --- the protocols, with stand-in methods -------------------------------------------------


def synthetic(n: int, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, 28, 28, generator=generator), torch.arange(n) % 10)


class Recording(Bench):
    """A bench that records the epochs of each training phase and its options."""

    def __init__(self, directory: Path, budget: int) -> None:
        super().__init__(directory, "lenet300", budget, synthetic(200, 0), synthetic(50, 1))
        self.phases: list[tuple[int, set[str]]] = []
        self.options: list[dict[str, Any]] = []

    def fit(self, net: nn.Module, epochs: int, seed: int, **options: Any) -> float:
        self.phases.append((epochs, set(options)))
        self.options.append(options)
        return super().fit(net, epochs, seed, **options)


class Calls(Magnitude):
    """Magnitude pruning that records the hooks the harness calls."""

    name = "calls"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []

    def scores(self, net: nn.Module, data: Any) -> dict[str, Tensor]:
        self.calls.append(("scores", None if data is None else data[0].shape[0]))
        return super().scores(net, data)

    def prepare_(self, net: nn.Module) -> nn.Module:
        self.calls.append(("prepare_",))
        return net

    def start_(self, net: nn.Module, sparsity: float, total_steps: int) -> None:
        self.calls.append(("start_", sparsity, total_steps))

    def penalty(self, net: nn.Module) -> Tensor | None:
        if not any(c[0] == "penalty" for c in self.calls):
            self.calls.append(("penalty",))
        return None

    def after_step(self, net: nn.Module, optimizer: Any, step: int) -> None:
        self.calls.append(("after_step", step))

    def finalize_(self, net: nn.Module) -> nn.Module:
        self.calls.append(("finalize_",))
        return net


def first_layer(net: nn.Module) -> Any:
    return next(iter(prunable_layers(net).values()))


def masked_sparsity(net: nn.Module) -> float:
    weights = [layer.weight for layer in prunable_layers(net).values()]
    return 1 - sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)


def test_during_training_runs_hooks_then_prunes_finalizes_and_fine_tunes(tmp_path):
    bench, method = Recording(tmp_path, budget=5), Calls()
    method.stage = "during_training"
    net, _ = bench._pruned(Item("lenet300", "calls", 0.75, 0), method)
    # Budget 5: F = 5 // 4 = 1 epoch of fine-tuning, 4 with the hooks; 2 steps an epoch.
    assert bench.phases == [(4, {"penalty", "after_step"}), (1, set())]
    assert method.calls[:3] == [("prepare_",), ("start_", 0.75, 8), ("penalty",)]
    assert [c[1] for c in method.calls if c[0] == "after_step"] == list(range(8))
    assert method.calls[-2:] == [("scores", 200), ("finalize_",)]  # all 200 examples
    assert masked_sparsity(net) == pytest.approx(0.75, abs=1e-5)  # whole weights: 266200


def test_a_penalty_per_example_is_scaled_to_the_loop_s_summed_data_term(tmp_path):
    bench, method = Recording(tmp_path, budget=1), Calls()
    method.stage = "during_training"
    method.penalty = lambda net: torch.tensor(0.25)  # type: ignore[method-assign]
    bench._pruned(Item("lenet300", "calls", 0.5, 0), method)
    # The loop sums the cross-entropy over the 200 training examples: 200 * 0.25.
    assert float(bench.options[0]["penalty"](None)) == 50.0


def fine_tuning_start(tmp_path: Path, policy: str, seed: int) -> tuple[Recording, Tensor]:
    """The first layer's weights when fine-tuning starts, after a prune with ``policy``."""
    bench = Recording(tmp_path, budget=2)
    starts = []
    original_fit = bench.fit

    def fit(net: nn.Module, epochs: int, seed: int, **options: Any) -> float:
        starts.append(first_layer(net).weight.detach().clone())
        return original_fit(net, epochs, seed, **options)

    method = type("WithPolicy", (Magnitude,), {"policy": policy})()
    bench.fit = fit  # type: ignore[method-assign]
    bench._pruned(Item("lenet300", policy, 0.5, seed), method)
    return bench, starts[1]  # starts[0] is the cached pretraining


def test_reinit_starts_fine_tuning_from_fresh_weights_under_the_mask(tmp_path):
    bench, start = fine_tuning_start(tmp_path, "reinit", 3)
    fresh = bench.initial_net(3)
    reinit_(fresh, reinit_seed(3))
    kept = start != 0
    assert torch.equal(start[kept], first_layer(fresh).weight.detach()[kept])
    initial = first_layer(bench.initial_net(3)).weight.detach()
    assert not torch.equal(start[kept], initial[kept])  # not the lottery ticket's rewind


def test_rewind_starts_fine_tuning_from_the_initial_weights_under_the_mask(tmp_path):
    bench, start = fine_tuning_start(tmp_path, "rewind", 3)
    initial = first_layer(bench.initial_net(3)).weight.detach()
    kept = start != 0
    assert torch.equal(start[kept], initial[kept])  # survivors: their initial values
    assert kept.float().mean() < 0.6  # and the mask stayed on


def test_at_init_prunes_the_seeded_initial_net_then_trains_the_whole_budget(tmp_path):
    bench, method = Recording(tmp_path, budget=3), Calls()
    method.stage = "at_init"
    net, _ = bench._pruned(Item("lenet300", "calls", 0.5, 7), method)
    assert bench.phases == [(3, set())]
    assert method.calls == [("prepare_",), ("scores", 200), ("finalize_",)]
    assert masked_sparsity(net) == pytest.approx(0.5, abs=1e-5)
    # The weights pruned are the smallest of the seed's initial net: torch's init, seed 7.
    first, initial = first_layer(net), first_layer(bench.initial_net(7)).weight.abs()
    kept = first.weight_mask.bool()
    assert initial[kept].min() >= initial[~kept].max()


def test_after_training_prunes_in_rounds_and_rewinds_to_the_cached_initial_weights(tmp_path):
    bench, method = Recording(tmp_path, budget=7), FakeIterative()
    net, _ = bench._pruned(Item("lenet300", "fake_iterative", 0.875, 0), method)
    # Budget 7: 3 epochs pretrained (cached), then 4 over 3 rounds: 1, 1, 2.
    assert bench.phases == [(3, set()), (1, set()), (1, set()), (2, set())]
    assert masked_sparsity(net) == pytest.approx(0.875, abs=1e-5)  # 1 - 0.5 ** 3
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["dense-0.pt"]
    # A second method reuses the pretrained net: no pretraining phase.
    bench.phases.clear()
    bench._pruned(Item("lenet300", "magnitude", 0.5, 0), Magnitude())
    assert bench.phases == [(4, set())]


def test_a_row_of_a_bayesian_family_trains_once_per_seed_and_selects_each_sparsity(tmp_path):
    bench = Recording(tmp_path, budget=1)
    rows = [bench.run(Item("lenet300", "sparse_vd", s, 0)) for s in (0.5, 0.9)]
    assert bench.phases == [(1, {"schedule", "objective"})]  # trained once, then cached
    assert [r["achieved_sparsity"] for r in rows] == pytest.approx([0.5, 0.9], abs=1e-5)
    assert {r["family"] for r in rows} == {"bayesian"}
    assert rows[0]["train_seconds"] == rows[1]["train_seconds"]  # the cached training's
    assert set(rows[0]) == set(COLUMNS)


def test_a_bayesian_familys_own_threshold_row_is_its_default_masked_net(tmp_path):
    bench = Recording(tmp_path, budget=1)
    own, _ = bench.bayesian(Item("lenet300", "sparse_vd", 0.0, 0))
    trained, _ = bench.bayesian_net(Item("lenet300", "sparse_vd", 0.0, 0))
    expected = bs.masks(trained)  # log alpha < 3, the family's rule
    for name, layer in prunable_layers(own).items():
        assert torch.equal(layer.weight_mask.bool(), expected[f"{name}.weight"])
    assert bench.phases == [(1, {"schedule", "objective"})]  # the cached net, once


def test_a_unit_gated_bayesian_family_prunes_each_layers_share(tmp_path):
    # Globally, L0's input gates of the 300-unit layer could all rank below the first
    # layer's and empty it (measured: 90 % error at 0-0-0 after a 20-epoch bench).
    bench = Recording(tmp_path, budget=1)
    net, _ = bench.bayesian(Item("lenet300", "l0", 0.9, 0))
    for layer in prunable_layers(net).values():
        kept = layer.weight_mask.bool().any(0).float().mean()  # input units kept
        assert 0.05 <= float(kept) <= 0.15


def test_rows_are_reproducible_whatever_ran_before_them(tmp_path):
    first = Recording(tmp_path / "a", budget=2)
    item = Item("lenet300", "random", 0.5, 1)
    alone = first.run(item)
    second = Recording(tmp_path / "b", budget=2)
    second.run(Item("lenet300", "dense", 0.0, 0))  # other rows first, other RNG draws
    torch.rand(10)
    after = second.run(item)
    timing = ("speedup", "train_seconds")
    assert {k: v for k, v in alone.items() if k not in timing} == {
        k: v for k, v in after.items() if k not in timing
    }


class Scripted(Bench):
    """A bench whose rows are computed instantly (the error is their seed), or fail."""

    def __init__(self, directory: Path, fail: Item | None = None) -> None:
        super().__init__(directory, "lenet300", 2, synthetic(1, 0), synthetic(1, 1))
        self.fail, self.ran = fail, []

    def run(self, item: Item) -> dict[str, Any]:
        self.ran.append(item)
        if item == self.fail:
            raise ValueError("boom")
        return row(item, error=float(item.seed))


def test_run_grid_skips_stored_rows_and_rows_another_process_holds(tmp_path):
    items = grid("lenet300", ["dense"], [], [0, 1, 2, 3])
    write_row(tmp_path, items[0], row(items[0], error=9.0))
    bench = Scripted(tmp_path)
    (tmp_path / "locks").mkdir()
    with filelock.FileLock(tmp_path / "locks" / f"row-{items[2].name}.lock"):
        assert run_grid(bench, items, progress=False) == 2
    assert bench.ran == [items[1], items[3]]
    assert [r["error"] for r in read_rows(tmp_path)] == [9.0, 1.0, 3.0]


def test_a_failing_row_names_itself_and_keeps_the_rows_before(tmp_path):
    items = grid("lenet300", ["dense"], [], [0, 1, 2])
    with pytest.raises(RowFailed, match=r"^row lenet300-dense-0.0-1 failed: ValueError: boom$"):
        run_grid(Scripted(tmp_path, fail=items[1]), items, progress=False)
    assert [r["seed"] for r in read_rows(tmp_path)] == [0]


# --- the command line's checks (in-process; tests/test_bench_cli.py runs real processes) ---


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--methods", "dense,prune_all"], "Unknown method 'prune_all'. Choose from dense,"),
        (["--methods", "magnitude", "--sparsities", "0.5,1.0"], "sparsity in [0, 1), got '1.0'"),
        (["--methods", "magnitude", "--shard", "2/2"], "0 <= i < n, got '2/2'"),
        (["--model", "lenet7", "--methods", "magnitude"], "invalid choice: 'lenet7'"),
        (["--methods", "dense,magnitude", "--budget", "1"], "at least 2 epochs"),
        (["--methods", "dense", "--budget", "2", "--out", ""], "expected a path"),
        (["--methods", "dense"], "bench needs --out (or --merge DIR"),
    ],
)
def test_bad_command_lines_end_in_one_line_and_exit_2(tmp_path, capsys, args, fragment):
    if "--budget" not in args:
        args = [*args, "--budget", "2"]
    if "--out" not in args and "needs --out" not in fragment:
        args = [*args, "--out", str(tmp_path / "out")]
    try:
        code = main(["bench", *args])
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_merge_of_a_folder_without_rows_is_refused(tmp_path, capsys):
    assert main(["bench", "--merge", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path} holds no bench rows (rows/); give the --out of a bench\n"
    )


def test_summary_table_averages_over_seeds_per_method_and_sparsity():
    def row(method, sparsity, seed, error, ece):
        return {"model": "lenet300", "method": method, "family": "f", "sparsity": sparsity,
                "seed": seed, "error": error, "ece": ece}  # fmt: skip

    rows = [row("dense", 0.0, 0, 0.02, 0.01), row("m", 0.9, 0, 0.02, 0.01),
            row("m", 0.9, 1, 0.04, 0.03), row("m", 0.99, 0, None, None)]  # fmt: skip
    table = to_markdown(rows).splitlines()
    assert table[2] == "| method | family | dense / own | 90.0% | 99.0% |"
    assert table[4] == "| dense | f | 2.00 / 0.0100 (n = 1) |  |  |"
    assert table[5] == "| m | f |  | 3.00 / 0.0200 (n = 2) | n/a |"


def test_a_method_may_choose_its_scope_and_unit_methods_default_to_each_layer():
    from bayessparse.bench.runner import scope_of
    from bayessparse.pruning import get_method

    assert scope_of(get_method("magnitude")) == "global"
    assert scope_of(get_method("filter_l1")) == "layer"
    assert scope_of(get_method("magnitude_local_rewind")) == "layer"


def test_plot_panels_group_methods_by_family_bayesian_first():
    from bayessparse.bench.plots import _families

    rows = [
        {"method": "dense", "family": "dense"},
        {"method": "magnitude", "family": "magnitude"},
        {"method": "gmp", "family": "magnitude"},
        {"method": "sparse_vd", "family": "bayesian"},
        {"method": "magnitude", "family": "magnitude"},
    ]
    assert _families(rows) == {"bayesian": ["sparse_vd"], "magnitude": ["magnitude", "gmp"]}


def test_method_groups_expand_in_order_without_repeats():
    from bayessparse.bench import expand, method_names, presets

    groups = presets()
    assert expand(["dense", "bayesian", "sparse_vd"]) == ["dense", *groups["bayesian"]]
    assert expand(["all"]) == method_names()
    assert set(groups["compression"]) <= set(groups["all"])
    assert "lottery_iterative" in groups["paganini_forde"]
    with pytest.raises(ValueError, match="or a group: all, bayesian"):
        expand(["everything"])
