"""Pieces of the training loop that need no Ray: optimiser rule, precision, checkpoint files."""

import os

import pytest
import torch
from helpers import tao_architecture

from oi_ray.checkpoint import Checkpoint, epoch_checkpoint_path, load_weights, point_latest_to
from oi_ray.config.schema import CuDNNConfig, OptimConfig
from oi_ray.data.assemble import InputGeometry
from oi_ray.errors import DataError
from oi_ray.model.inputs import InputNormalizer
from oi_ray.training.schedule import learning_rate, training_progress
from oi_ray.training.step import Precision, StepRule, load_optimizer_state, make_optimizer, training_steps
from oi_ray.training.worker import PairDistance, choose_algorithms

SHAPE = (3, 16, 8)


def test_optimizer_follows_tao_rule():
    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = make_optimizer(params, OptimConfig(type="Adam", lr=0.01, weight_decay=0.5))
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["weight_decay"] == 0
    sgd = make_optimizer(params, OptimConfig(type="SGD", lr=0.01, momentum=0.8, weight_decay=0.5))
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.8, 0.5)


def test_pair_distance_module_is_the_models_distance():
    torch.manual_seed(0)
    net = tao_architecture("Siamese_1", SHAPE, 5).build().eval()
    test, golden = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)
    torch.testing.assert_close(PairDistance(net)(test, golden), net.distance(test, golden))


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("clip", [0.0, 0.1])
def test_training_steps_lower_the_loss(mixed, clip):
    torch.manual_seed(0)
    net = tao_architecture("Siamese_3", SHAPE, 5).build()
    optim = OptimConfig(lr=1e-3, lr_schedule="cosine")
    optimizer = make_optimizer(net.parameters(), optim)
    test, golden = torch.randn(16, *SHAPE), torch.randn(16, *SHAPE)
    target = torch.tensor([0, 1] * 8)
    dtypes, rates = [], []

    def model(test, golden):
        distance = net.distance(test, golden)
        dtypes.append(distance.dtype)
        rates.append(optimizer.param_groups[0]["lr"])
        return distance

    losses = [loss.item() for loss in training_steps(
        model, optimizer, [(test, golden, target)] * 10, StepRule(2.0, optim, num_epochs=2, clip_grad_norm=clip),
        Precision(torch.device("cpu"), mixed), epoch=2, steps=10)]
    assert losses[-1] < losses[0]
    assert set(dtypes) == {torch.bfloat16 if mixed else torch.float32}
    # epoch 2 of 2: the cosine schedule's second half, from lr / 2 down
    assert rates[0] == pytest.approx(5e-4) and rates[-1] == pytest.approx(learning_rate(optim, 0.95))


def test_clipping_bounds_the_gradient_the_step_applies():
    """With clip_grad_norm, the gradient SGD applies has at most that norm."""
    torch.manual_seed(0)
    net = tao_architecture("Siamese_1", SHAPE, 5).build()
    optim = OptimConfig(type="SGD", lr=1.0, momentum=0.0, weight_decay=0.0)
    optimizer = make_optimizer(net.parameters(), optim)
    before = torch.cat([parameter.detach().flatten().clone() for parameter in net.parameters()])
    batch = (torch.randn(8, *SHAPE) * 10, torch.randn(8, *SHAPE), torch.tensor([0, 1] * 4))
    list(training_steps(net.distance, optimizer, [batch], StepRule(2.0, optim, 1, clip_grad_norm=0.01),
                        Precision(torch.device("cpu"), False), epoch=1, steps=1))
    after = torch.cat([parameter.detach().flatten() for parameter in net.parameters()])
    assert 0 < float((after - before).norm()) <= 0.01 + 1e-6


def test_channels_last_normalizer_keeps_values():
    geometry = InputGeometry(1, 4, 5, None, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    pictures = torch.randint(0, 256, (2, 4, 5, 3), dtype=torch.uint8)
    plain = InputNormalizer(geometry)(pictures)
    nhwc = InputNormalizer(geometry, channels_last=True)(pictures)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(plain, nhwc)
    expected = (pictures[0, 1, 2, 0].float() / 255 - 0.5) / 0.2
    torch.testing.assert_close(plain[0, 0, 1, 2], expected)


def test_latest_link_is_replaced_atomically(tmp_path):
    for epoch in (1, 2):
        path = epoch_checkpoint_path(tmp_path, epoch)
        path.write_bytes(b"x")
        latest = point_latest_to(path)
    assert path.name == "model_epoch_001.pth", "TAO counts checkpoint epochs from 000"
    assert os.readlink(latest) == "model_epoch_001.pth" and latest.name == "oi_model_latest.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_epoch_000.pth", "model_epoch_001.pth", "oi_model_latest.pth"]


def test_weights_that_do_not_fit_are_named(tmp_path):
    small = tao_architecture("Siamese_1", SHAPE, 5).build()
    bigger_input = tao_architecture("Siamese_1", (3, 32, 8), 5).build()
    with pytest.raises(DataError, match=r"does not fit model.model_type=Siamese_1 with input 3x32x8: "
                                        r"fc1.0.weight: \(500, 1024\) in the file, \(500, 2048\) expected"):
        load_weights(bigger_input, Checkpoint(small.state_dict()), "old.pth",
                     tao_architecture("Siamese_1", (3, 32, 8)))
    with pytest.raises(DataError, match=r"does not fit .*fc1.2.running_mean.* \(\+\d+ more\)"):
        load_weights(tao_architecture("Siamese_3", SHAPE, 5).build(), Checkpoint(small.state_dict()),
                     "x.pth", tao_architecture("Siamese_3", SHAPE))


def test_resumed_optimizer_keeps_its_moments_and_takes_the_specs_lr():
    net = tao_architecture("Siamese_1", SHAPE, 5).build()
    first = make_optimizer(net.parameters(), OptimConfig(type="Adam", lr=1e-3))
    net.distance(torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)).sum().backward()
    first.step()
    resumed = make_optimizer(net.parameters(), OptimConfig(type="Adam", lr=1e-5))
    load_optimizer_state(resumed, first.state_dict())
    assert [group["lr"] for group in resumed.param_groups] == [1e-5]
    moments = resumed.state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(moments, first.state_dict()["state"][0]["exp_avg"])


def test_deterministic_cudnn_key_asks_a_gpu_worker_for_deterministic_algorithms(monkeypatch):
    """TAO's train.cudnn.deterministic: on a GPU also PyTorch's deterministic algorithms and
    cuBLAS's reproducible workspace (a seeded GPU run repeats); on a CPU, nothing more."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = CuDNNConfig(benchmark=torch.backends.cudnn.benchmark, deterministic=torch.backends.cudnn.deterministic)
    try:
        choose_algorithms(CuDNNConfig(benchmark=False, deterministic=True), torch.device("cpu"))
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        choose_algorithms(CuDNNConfig(benchmark=False, deterministic=True), torch.device("cuda", 0))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled(), "an operation without one warns, not fails"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        choose_algorithms(CuDNNConfig(benchmark=False, deterministic=True), torch.device("cuda", 0))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8", "the user's setting stays"
        choose_algorithms(CuDNNConfig(benchmark=True, deterministic=False), torch.device("cuda", 0))
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        choose_algorithms(before, torch.device("cpu"))


def test_cosine_schedule_falls_from_the_rate_to_zero_and_constant_keeps_it():
    cosine = OptimConfig(lr=2e-3, lr_schedule="cosine")
    assert [learning_rate(cosine, progress) for progress in (0.0, 0.25, 0.5, 1.0)] == pytest.approx(
        [2e-3, 2e-3 * (1 + 2 ** -0.5) / 2, 1e-3, 0.0])
    assert learning_rate(OptimConfig(lr=2e-3), 0.7) == 2e-3
    # step 5 of 10 in epoch 2 of 4: (1 + 0.5) / 4 of all training
    assert training_progress(epoch=2, step=5, steps=10, num_epochs=4) == pytest.approx(0.375)
