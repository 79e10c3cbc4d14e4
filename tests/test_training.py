"""The SVI training loop: schedules, checkpoints, resuming, errors, and the CLI."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from torch import nn

import bayessparse as bs
from bayessparse.cli import main
from bayessparse.infer import linear_decay, linear_warmup
from bayessparse.metrics import error_rate, predict_logits
from bayessparse.recipes import build_net
from bayessparse.training import (
    CheckpointError,
    RunFolder,
    Schedule,
    SparseClassifier,
    StorageError,
    Teacher,
    TrainingDiverged,
    load_checkpoint,
    train,
)

REPO = Path(__file__).resolve().parents[1]


def toy_problem(seed: int = 0, n: int = 300):
    """A small linearly separable 3-class problem."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :3].argmax(-1)).long()
    return x, y


def toy_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return bs.to_sparse_(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)))


def run(net, x, y, **kwargs):
    defaults = dict(
        epochs=3, batch_size=50, lr=1e-2, schedule=Schedule((0.0, 1.0)), progress=False
    )
    return train(net, x, y, **{**defaults, **kwargs})


def test_training_learns_and_logs_data_term_and_kl_separately():
    x, y = toy_problem()
    net = toy_net()
    history = run(net, x, y, epochs=8, eval_data=(x, y))
    first, last = history.epochs[0], history.epochs[-1]
    assert [r["epoch"] for r in history.epochs] == list(range(1, 9))
    assert last["data_term"] < first["data_term"]
    assert last["test_error"] < 0.2
    assert all(r["kl"] > 0 and r["compression"] >= 1 for r in history.epochs)
    assert first["kl_weight"] < 1 and last["kl_weight"] == 1
    assert last["lr"] < 1e-2


def test_model_loss_is_scaled_data_term_plus_weighted_kl():
    x, y = toy_problem()
    net = toy_net()
    model = SparseClassifier(net, num_data=3000, kl_weight=0.25)
    trace = pyro.poutine.trace(model).get_trace(x[:50], y[:50])
    trace.compute_log_prob()
    data = trace.nodes["y"]["log_prob_sum"]
    ce = nn.functional.cross_entropy(trace.nodes["_RETURN"]["value"], y[:50], reduction="sum")
    assert torch.allclose(data, -ce * 3000 / 50)
    assert torch.allclose(trace.nodes["kl"]["log_prob_sum"], -0.25 * bs.kl(net))
    assert model.last_kl == pytest.approx(bs.kl(net).item(), rel=1e-6)


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    x, y = toy_problem()
    straight = toy_net()
    run(straight, x, y, epochs=3)

    ckpt = tmp_path / "run" / "checkpoint.pt"

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(
            toy_net(),
            x,
            y,
            epochs=3,
            checkpoint=ckpt,
            meta={"name": "toy"},
            on_epoch_end=interrupt,
        )
    resumed = toy_net(seed=123)  # a fresh process would build a new network
    history = run(resumed, x, y, epochs=3, checkpoint=ckpt, resume=True, meta={"name": "toy"})
    assert history.completed == 3
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_parameter_average_is_the_bias_corrected_exponential_average_of_the_steps():
    x, y = toy_problem()
    net = toy_net()
    moment = [torch.zeros_like(p) for p in net.parameters()]  # Adam's form: from zero
    decay, steps = 0.9, []

    def follow(net, optimizer, step):  # after each step, before the loop's own average
        steps.append(step)
        for m, p in zip(moment, net.parameters(), strict=True):
            m.mul_(decay).add_(p.detach(), alpha=1 - decay)

    history = run(net, x, y, epochs=2, ema=decay, after_step=follow, eval_data=(x, y))
    correction = 1 - decay ** len(steps)
    for m, p in zip(moment, net.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), m / correction)  # the net ends averaged
    # ... and each epoch was evaluated with the average in place.
    final = error_rate(predict_logits(net.eval(), x), y)
    assert history.epochs[-1]["test_error"] == pytest.approx(final)
    with pytest.raises(ValueError, match="decay in \\(0, 1\\), got 1.5"):
        run(toy_net(), x, y, ema=1.5)


def test_after_one_step_the_average_is_that_steps_parameters_not_the_initial_ones():
    x, y = toy_problem()
    net, stepped = toy_net(), []
    initial = [p.detach().clone() for p in net.parameters()]

    def keep(net, optimizer, step):
        stepped.extend(p.detach().clone() for p in net.parameters())

    run(net, x, y, epochs=1, batch_size=len(x), ema=0.999, after_step=keep)
    for p, s in zip(net.parameters(), stepped, strict=True):
        torch.testing.assert_close(p.detach(), s)
    assert not all(torch.equal(p, i) for p, i in zip(net.parameters(), initial, strict=True))


def test_resumed_training_with_a_parameter_average_equals_uninterrupted_training(tmp_path):
    x, y = toy_problem()
    straight = toy_net()
    run(straight, x, y, epochs=3, ema=0.9)
    ckpt = tmp_path / "run" / "checkpoint.pt"

    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(toy_net(), x, y, epochs=3, ema=0.9, checkpoint=ckpt, on_epoch_end=interrupt)
    resumed = toy_net(seed=123)
    history = run(resumed, x, y, epochs=3, ema=0.9, checkpoint=ckpt, resume=True)
    assert history.completed == 3
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="ema"):  # the average is part of the run
        run(toy_net(), x, y, epochs=4, ema=0.5, checkpoint=ckpt, resume=True)


def test_existing_checkpoint_is_never_overwritten_without_resume(tmp_path):
    x, y = toy_problem()
    ckpt = tmp_path / "checkpoint.pt"
    run(toy_net(), x, y, epochs=1, checkpoint=ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        run(toy_net(), x, y, epochs=2, checkpoint=ckpt)
    assert ckpt.read_bytes() == before
    with pytest.raises(ValueError, match="different run"):
        run(toy_net(), x, y, epochs=2, checkpoint=ckpt, resume=True, meta={"lr": 5})


def test_bad_arguments_are_rejected_with_the_value():
    x, y = toy_problem()
    with pytest.raises(ValueError, match="epochs.*0"):
        run(toy_net(), x, y, epochs=0)
    with pytest.raises(ValueError, match="batch_size.*-1"):
        run(toy_net(), x, y, batch_size=-1)
    with pytest.raises(ValueError, match="lr=0"):
        run(toy_net(), x, y, lr=0)
    with pytest.raises(ValueError, match=r"got \(300, 20\) images and \(299,\) labels"):
        run(toy_net(), x, y[:-1])
    with pytest.raises(ValueError, match="to_sparse_"):
        run(nn.Sequential(nn.Linear(20, 3)), x, y, objective="svi")
    with pytest.raises(ValueError, match="Unknown objective 'elbo'"):
        run(toy_net(), x, y, objective="elbo")


def test_stale_param_store_entries_do_not_capture_training():
    x, y = toy_problem()
    old = toy_net()
    run(old, x, y, epochs=1)  # leaves "0.weight" ... in the global param store
    new = toy_net(seed=1)
    before = new[0].weight.detach().clone()
    run(new, x, y, epochs=1)
    assert not torch.equal(new[0].weight, before)
    assert pyro.get_param_store()["0.weight"] is new[0].weight


def test_joint_optim_steps_exactly_like_one_torch_optimizer():
    torch.manual_seed(0)
    a = pyro.param("a", torch.randn(5))
    b = pyro.param("b", torch.randn(2, 3))
    twins = [p.detach().clone().requires_grad_() for p in (a, b)]
    joint = bs.JointOptim(torch.optim.Adam, {"lr": 0.1})
    plain = torch.optim.Adam(twins, lr=0.1)
    for step in range(5):
        joint.lr_factor = 0.5**step
        plain.param_groups[0]["lr"] = 0.1 * 0.5**step
        for params in ((a, b), twins):
            (params[0].square().sum() + params[1].sin().sum()).backward()
        joint({b, a})  # Pyro passes a set
        plain.step()
        plain.zero_grad()
        assert torch.equal(a, twins[0]) and torch.equal(b, twins[1])
        assert a.grad is None  # freed, so SVI's zero_grads has nothing to do
    with pytest.raises(TypeError, match="optim_args"):
        bs.JointOptim(torch.optim.Adam, lambda *_: {"lr": 1})  # type: ignore[arg-type]


def test_schedules():
    assert [linear_warmup(e, 5, 20) for e in (0, 5, 12.5, 20, 30)] == [0, 0, 0.5, 1, 1]
    assert linear_warmup(3, 2, 2) == 1.0 and linear_warmup(1, 2, 2) == 0.0
    assert [linear_decay(e, 200, 100) for e in (0, 100, 150, 200)] == [1, 1, 0.5, 0]


def test_cli_trains_on_mnist_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--epochs",
            "3",
            "--kl-warmup",
            "0.5",
            "2",
            "--out",
            str(out),
            "--no-progress",
            "--threads",
            "2",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    printed = capsys.readouterr().out
    assert "test error" in printed and "compression" in printed
    # Three epochs of sparse VD on LeNet-300-100 (measured: 3.3 % error at 25x): it learns
    # and it sparsifies.
    assert report["error"] < 0.04
    assert report["compression"] > 15
    assert 0 < report["nll"] < 0.15 and 0 <= report["ece"] < 0.05
    assert set(report["layers"]) == {"1", "3", "5"}
    assert len(report["history"]) == 3 and report["wall_seconds"] > 0
    assert main(["train", "--epochs", "2", "--out", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_reports_missing_data_clearly(tmp_path, capsys):
    assert main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "Missing checksum file" in capsys.readouterr().err


def test_paper_init_is_what_the_official_code_runs():
    torch.manual_seed(0)
    net = build_net("lenet5", "sparse_vd", "paper").requires_grad_(False)
    conv, dense = net[3], net[7]
    bound = math.sqrt(6 / (20 * 25 + 50 * 25))  # Glorot uniform of a 20->50 5x5 conv
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    # N(0, 0.01^2) over 400,000 weights: the sample sd is within 1 % of 0.01.
    assert abs(float(dense.weight.std()) - 0.01) < 1e-4
    assert all(float(m.bias.abs().max()) == 0 for _, m in bs.sparse_modules(net))
    with pytest.raises(ValueError, match="Unknown init"):
        build_net("lenet5", "sparse_vd", "bogus")


@pytest.mark.parametrize("method", ["sbp", "sparse_vd", "horseshoe"])
def test_pretrained_start_puts_the_dense_weights_in_the_posterior_means(method):
    dense = build_net("lenet5", "dense", "torch").state_dict()
    net = build_net("lenet5", method, "paper", pretrained=dense)
    for name, layer in bs.sparse_modules(net):
        assert torch.equal(layer.weight, dense[f"{name}.weight"])
        assert torch.equal(layer.bias, dense[f"{name}.bias"])


def test_pretrained_start_refuses_another_networks_weights():
    with pytest.raises(ValueError, match="not those of a dense lenet5.*--method dense"):
        build_net("lenet5", "sbp", pretrained=build_net("lenet300", "dense").state_dict())
    bayesian = build_net("lenet5", "sparse_vd").state_dict()  # a posterior, not a dense net
    with pytest.raises(ValueError, match="log_sigma2"):
        build_net("lenet5", "sbp", pretrained=bayesian)


def test_l0_training_keeps_exactly_the_informative_inputs():
    x, y = toy_problem()
    torch.manual_seed(0)
    net = bs.to_sparse_(
        nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)), "l0", l0_lambda=0.5
    )
    before = float(bs.kl(net).detach())
    # 20 epochs x 6 batches at lr 0.05: log alpha can move by about 6, enough to close gates.
    history = run(net, x, y, epochs=20, lr=0.05, eval_data=(x, y))
    assert float(bs.kl(net).detach()) < 0.5 * before
    # Only the first 3 inputs carry the label: exactly their gates stay open.
    kept_inputs = bs.masks(net)["0.weight"].any(0)
    assert torch.equal(kept_inputs.nonzero().flatten(), torch.tensor([0, 1, 2]))
    assert history.epochs[-1]["test_error"] < 0.1


@pytest.mark.parametrize("method", ["group_nj", "horseshoe", "spike_slab"])
def test_group_training_keeps_exactly_the_informative_inputs(method):
    # Through train(): SparseClassifier's guide draws the horseshoe scales, and the KL
    # warm-up (weight 0 at the start) masks them out of the ELBO without breaking SVI. 3000
    # examples, so that the data rather than the prior decide which hidden units stay.
    x, y = toy_problem(n=3000)
    torch.manual_seed(0)
    net = bs.to_sparse_(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)), method)
    history = run(net, x, y, epochs=20, lr=0.03, eval_data=(x, y))
    kept_inputs = bs.masks(net)["0.weight"].any(0)
    assert torch.equal(kept_inputs.nonzero().flatten(), torch.tensor([0, 1, 2]))
    assert history.epochs[-1]["test_error"] < 0.1
    assert all(math.isfinite(r["data_term"]) for r in history.epochs)


def test_build_net_takes_one_value_per_layer_from_a_list():
    net = build_net("lenet5", "l0", "he", l0_lambda=[10.0, 0.5, 0.1, 10.0], droprate_init=0.3)
    layers = [m for _, m in bs.sparse_modules(net)]
    assert [m.l0_lambda for m in layers] == [10.0, 0.5, 0.1, 10.0]
    assert all(m.droprate_init == 0.3 for m in layers)
    with pytest.raises(ValueError, match="l0_lambda has 3 values for 4 layers"):
        build_net("lenet5", "l0", l0_lambda=[1.0, 1.0, 1.0])


def test_cli_layer_options_are_read_as_json_and_bad_ones_refused(capsys):
    from bayessparse.cli import _parser

    args = _parser().parse_args(
        ["train", "--layer", "l0_lambda=[10,0.5,0.1,10]", "--layer", "gate=output"]
    )
    assert args.layer == [("l0_lambda", [10, 0.5, 0.1, 10]), ("gate", "output")]
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--layer", "no-equals-sign"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_divergence_stops_at_once_and_keeps_the_last_finite_checkpoint(tmp_path):
    x, y = toy_problem()
    net = toy_net()
    ckpt = tmp_path / "checkpoint.pt"

    def poison(record):
        if record["epoch"] == 2:  # as a step that overflows would leave it
            with torch.no_grad():
                net[2].weight_log_sigma2[0, 0] = math.nan

    with pytest.raises(TrainingDiverged, match="became NaN or inf at epoch 3, batch 1"):
        run(net, x, y, epochs=4, checkpoint=ckpt, on_epoch_end=poison)
    saved = load_checkpoint(ckpt)
    assert len(saved["history"]) == 2
    assert all(bool(torch.isfinite(t).all()) for t in saved["net"].values())


def test_float16_overflow_is_named_as_such():
    x, y = toy_problem()
    torch.manual_seed(0)
    layers = [nn.Linear(20, 3000), nn.ReLU(), nn.Linear(3000, 30), nn.Linear(30, 3)]
    net = bs.to_sparse_(nn.Sequential(*layers)).half()
    # The KL of 60,000 sparse-VD weights at their initial log sigma^2 = -10 is far beyond
    # float16's 65504.
    with pytest.raises(TrainingDiverged, match="float16.*Train in float32"):
        run(net, x.half(), y, epochs=1)


def test_numpy_data_is_accepted_and_bad_labels_are_named():
    x, y = toy_problem()
    history = run(toy_net(), x.numpy(), y.numpy(), epochs=1)
    assert history.completed == 1
    bad = y.clone()
    bad[[4, 9]] = 3
    with pytest.raises(ValueError, match=r"indices 0..2 .* 2 labels are outside, e.g. \[3\]"):
        run(toy_net(), x, bad)
    with pytest.raises(TypeError, match="labels.long()"):
        run(toy_net(), x, y.float())
    with pytest.raises(ValueError, match="cannot take the training images of shape"):
        run(toy_net(), x[:, :10], y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": math.inf}, "finite, positive learning rate"),
        ({"lr": math.nan}, "finite, positive learning rate"),
        ({"seed": 2**64}, r"seed to be an integer in \[0, 2\*\*32\)"),
        ({"seed": -1}, r"seed to be an integer in \[0, 2\*\*32\)"),
    ],
)
def test_bad_numbers_are_refused_before_training(kwargs, match):
    x, y = toy_problem()
    with pytest.raises(ValueError, match=match):
        run(toy_net(), x, y, **kwargs)


def test_schedule_refuses_nan_negative_and_reversed_values():
    with pytest.raises(ValueError, match="KL warm-up start"):
        Schedule((math.nan, math.nan))
    with pytest.raises(ValueError, match="Swap them"):
        Schedule((5.0, 2.0))
    with pytest.raises(ValueError, match="lr_decay_start"):
        Schedule(lr_decay_start=math.nan)
    with pytest.raises(ValueError, match="KL warm-up end"):
        Schedule((0.0, -1.0))


def test_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from bayessparse.training import storage

    x, y = toy_problem()
    ckpt = tmp_path / "checkpoint.pt"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:  # the second checkpoint (each write syncs file, then folder)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    with pytest.raises(StorageError, match="checkpoint.pt': the disk is full"):
        run(toy_net(), x, y, epochs=3, checkpoint=ckpt)
    assert len(load_checkpoint(ckpt)["history"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoint.pt"]


def test_checkpoints_hold_plain_data_only(tmp_path):
    from bayessparse.training import save_checkpoint

    path = tmp_path / "c.pt"
    save_checkpoint({"x": torch.ones(2), "note": "ok", "n": [1, 2.5, None]}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    save_checkpoint({"object": SparseClassifier}, path)  # a class: not plain data
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04 a zip file, but not ours")
    with pytest.raises(CheckpointError, match="not a bayessparse checkpoint"):
        load_checkpoint(path)


def test_nan_images_are_refused_before_training():
    x, y = toy_problem()
    x[[5, 7], 3] = math.nan
    with pytest.raises(ValueError, match="2 training images hold NaN or infinite values"):
        run(toy_net(), x, y)


def test_a_plain_network_trains_by_the_supervised_objective_and_resumes_exactly(tmp_path):
    x, y = toy_problem()

    def plain(seed=0):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))

    def l1(net):
        return sum(p.abs().sum() for p in net.parameters())

    straight = plain()
    history = run(straight, x, y, epochs=4, penalty=l1, eval_data=(x, y))
    assert history.epochs[-1]["test_error"] < 0.1
    assert history.epochs[-1]["kl"] < history.epochs[0]["kl"]  # the L1 penalty shrinks

    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        run(plain(), x, y, epochs=4, penalty=l1, checkpoint=ckpt, on_epoch_end=interrupt)
    resumed = plain(seed=9)
    run(resumed, x, y, epochs=4, penalty=l1, checkpoint=ckpt, resume=True)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="SVI takes no penalty"):
        run(toy_net(), x, y, penalty=l1)


def test_plain_training_takes_adam_fused_or_the_pruning_papers_sgd():
    x, y = toy_problem()
    optimizers = []

    def record(net, optimizer, step):
        optimizers.append(optimizer)

    def plain():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))

    run(plain(), x, y, epochs=1, after_step=record)
    assert isinstance(optimizers[-1], torch.optim.Adam)
    assert optimizers[-1].defaults["fused"]  # one kernel for every parameter
    history = run(
        plain(), x, y, epochs=8, lr=0.1, optimizer="sgd", after_step=record, eval_data=(x, y)
    )
    sgd = optimizers[-1]
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.9, 5e-4)
    assert history.epochs[-1]["test_error"] < 0.1
    with pytest.raises(ValueError, match="Unknown optimizer 'rmsprop'"):
        run(plain(), x, y, optimizer="rmsprop")
    with pytest.raises(ValueError, match="SVI trains with Adam, got optimizer='sgd'"):
        run(toy_net(), x, y, optimizer="sgd")


def test_distilled_student_learns_from_a_frozen_teacher_and_resumes_exactly(tmp_path):
    x, y = toy_problem()

    def plain(seed=0, width=32):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, 3))

    teacher = plain(seed=1, width=64).train()
    before = [p.clone() for p in teacher.parameters()]
    # alpha = 0 is the plain cross-entropy: the same steps as the supervised objective.
    labels_only, hard = plain(), plain()
    run(labels_only, x, y, epochs=2)
    run(hard, x, y, epochs=2, teacher=Teacher(teacher, temperature=20.0, alpha=0.0))
    for a, b in zip(labels_only.parameters(), hard.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    straight = plain()
    soft = Teacher(teacher, temperature=20.0, alpha=0.9)
    run(straight, x, y, epochs=3, teacher=soft)
    assert not teacher.training  # predicted in eval mode, never trained
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))
    assert not torch.allclose(straight[0].weight, labels_only[0].weight)

    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        run(plain(), x, y, epochs=3, teacher=soft, checkpoint=ckpt, on_epoch_end=interrupt)
    hotter = Teacher(teacher, temperature=5.0, alpha=0.9)
    with pytest.raises(CheckpointError, match="teacher"):
        run(plain(), x, y, epochs=3, teacher=hotter, checkpoint=ckpt, resume=True)
    resumed = plain(seed=9)
    run(resumed, x, y, epochs=3, teacher=soft, checkpoint=ckpt, resume=True)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="SVI takes no teacher"):
        run(toy_net(), x, y, teacher=soft)
    with pytest.raises(ValueError, match="temperature > 0"):
        Teacher(teacher, temperature=0.0, alpha=0.5)


def test_after_step_sees_every_step_with_the_torch_optimizer_and_pruned_nets_stay_pruned():
    from bayessparse.pruning import prune

    x, y = toy_problem()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    masks = prune(net, "magnitude", 0.8)
    seen = []

    def after_step(net_, optimizer, step):
        assert net_ is net and isinstance(optimizer, torch.optim.Adam)
        seen.append(step)

    run(net, x, y, epochs=2, after_step=after_step)
    assert seen == list(range(2 * 6))  # 300 examples in batches of 50, two epochs
    for key, mask in masks.items():
        layer = net[int(key.split(".")[0])]
        assert torch.equal(layer.weight[~mask], torch.zeros(int((~mask).sum())))

    svi_steps = []
    run(toy_net(), x, y, epochs=1, after_step=lambda n, o, s: svi_steps.append((o, s)))
    assert svi_steps == [(None, s) for s in range(6)]  # Pyro's optimiser is not a torch one


def test_training_draws_from_its_own_random_stream():
    x, y = toy_problem()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = toy_net()
    torch.manual_seed(123)
    run(first, x, y, epochs=1, seed=5)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream is untouched
    second = toy_net()
    run(second, x, y, epochs=1, seed=5)  # the run's stream depends on its seed only
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_run_folder_releases_even_when_the_working_directory_is_gone(tmp_path, monkeypatch):
    """A relative run folder whose working directory was removed under the run: leaving
    it must not raise (that would hide the error that ended the run) and frees the lock."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    with RunFolder("run"):
        gone.joinpath("run", ".lock").unlink()
        gone.joinpath("run", ".owner").unlink()
        gone.joinpath("run").rmdir()
        gone.rmdir()
    monkeypatch.chdir(tmp_path)
    with RunFolder(gone / "run"):  # the old lock is no longer held by this process
        pass


def test_keep_freed_memory_is_set_once_and_can_be_switched_off():
    # In fresh processes: the setting is per process, and the first call decides.
    script = "from bayessparse.training import keep_freed_memory as k; print(k(), k())"
    glibc = platform.libc_ver()[0] == "glibc" and sys.platform.startswith("linux")
    on = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert on.stdout.split() == [str(glibc)] * 2
    env = {**os.environ, "BAYESSPARSE_MALLOPT": "0"}
    off = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert off.stdout.split() == ["False", "False"]
