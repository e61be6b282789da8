"""TAO's Siamese models (their layouts) and the contrastive loss."""

from dataclasses import asdict

import pytest
import torch
from helpers import tao_architecture
from torch import nn
from torch.nn import functional as F

from oi_ray.config.schema import ModelType, SpatialModelConfig
from oi_ray.model.loss import contrastive_loss
from oi_ray.model.registry import Architecture
from oi_ray.model.siamese import SIAMESE_MODELS, SiameseNet, embedding_distance, reflect_by_slices
from oi_ray.model.spatial import SiameseSpatial

INPUT = (3, 24, 8)  # e.g. 3 lightings of 8x8, linear


def test_registry_builds_every_accepted_model_type():
    """Every ModelType validation accepts builds a network of its kind."""
    assert {*SIAMESE_MODELS, ModelType.SPATIAL} == set(ModelType)
    for model_type in ModelType:
        shape = (3, 16, 16)
        net = Architecture(model_type, shape, (1, 1), 5, asdict(SpatialModelConfig())
                           if model_type == ModelType.SPATIAL else {}).build()
        assert isinstance(net, SiameseSpatial if model_type == ModelType.SPATIAL else SiameseNet), model_type


@pytest.mark.parametrize("model_type", sorted(ModelType))
def test_a_golden_embedded_once_scores_every_test_shot_as_the_whole_pair_does(model_type):
    """The two halves a golden library needs: ``embed`` one side, ``compare`` two sides' outputs."""
    torch.manual_seed(0)
    shape = (3, 32, 16)  # 2 lightings of 16x16, linear
    options = asdict(SpatialModelConfig()) if model_type == ModelType.SPATIAL else {}
    model = Architecture(model_type, shape, (2, 1), 5, options).build().eval()
    tests, golden = torch.randn(6, *shape), torch.randn(1, *shape)
    with torch.no_grad():
        whole = model.distance(tests, golden.expand(6, -1, -1, -1))
        kept = model.embed(golden)  # once, then reused for every test shot
        halves = model.compare(model.embed(tests), kept.repeat(6, *[1] * (kept.dim() - 1)))
    assert halves.shape == (6,) and whole.min() > 0
    assert torch.allclose(halves, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", sorted(SIAMESE_MODELS))
def test_forward_backward_shapes(model_type):
    torch.manual_seed(0)
    model = tao_architecture(model_type, INPUT, embedding_dim=5).build()
    test, golden = torch.randn(4, *INPUT), torch.randn(4, *INPUT)
    first, second = model(test, golden)
    assert first.shape == second.shape == (4, 5)
    distance = model.distance(test, golden)
    assert distance.shape == (4,)
    contrastive_loss(distance, torch.tensor([0, 1, 0, 1]), margin=2.0).backward()
    assert model.fc1[0].weight.grad is not None and model.cnn1[1].weight.grad is not None


def test_branches_share_weights():
    model = tao_architecture("Siamese_3", INPUT, 5).build().eval()
    images = torch.randn(2, *INPUT)
    assert torch.allclose(model.distance(images, images), torch.zeros(2), atol=1e-5)


def test_state_dict_layout_matches_tao():
    siamese_3 = tao_architecture("Siamese_3", INPUT, 5).build().state_dict()
    assert siamese_3["fc1.0.weight"].shape == (512, 8 * 24 * 8), "first Linear sees 8 channels x H' x W'"
    assert {"cnn1.1.weight", "cnn1.5.weight", "cnn1.9.weight", "cnn1.3.running_mean",
            "cnn1.7.running_mean", "cnn1.11.running_mean", "fc1.2.running_var", "fc1.5.running_var",
            "fc1.3.weight", "fc1.6.weight"} <= set(siamese_3)
    assert siamese_3["fc1.6.weight"].shape == (5, 512)
    siamese_1 = tao_architecture("Siamese_1", INPUT, 7).build().state_dict()
    assert [k for k in siamese_1 if k.startswith("fc1")] == [
        "fc1.0.weight", "fc1.0.bias", "fc1.2.weight", "fc1.2.bias", "fc1.4.weight", "fc1.4.bias"]
    assert siamese_1["fc1.0.weight"].shape == (500, 8 * 24 * 8)


def test_distance_is_l2_with_tao_eps():
    first = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    second = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    assert embedding_distance(first, second).tolist() == pytest.approx([5.0, 2 ** 0.5 * 1e-6], rel=1e-4)


def test_contrastive_loss_on_hand_made_distances():
    distance = torch.tensor([0.5, 1.0, 3.0, 0.0])
    target = torch.tensor([0, 1, 1, 0])
    # PASS: 0.25 and 0; defects: (2-1)^2 = 1 and clamp(2-3) = 0 -> mean 1.25 / 4
    assert contrastive_loss(distance, target, margin=2.0).item() == pytest.approx(1.25 / 4)
    assert contrastive_loss(distance, target, margin=4.0).item() == pytest.approx((0.25 + 9 + 1) / 4)


@pytest.fixture
def deterministic_algorithms():
    """PyTorch's deterministic algorithms on for one test (as a GPU training worker asks for them)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("padding", [(1, 1, 1, 1), (2, 1, 0, 3)])
def test_reflection_by_slices_is_reflection_padding(padding):
    images = torch.randn(2, 3, 7, 9, requires_grad=True)
    reference, sliced = F.pad(images, padding, mode="reflect"), reflect_by_slices(images, padding)
    assert torch.equal(sliced, reference)
    upstream = torch.randn_like(reference)
    (expected,) = torch.autograd.grad(reference, images, upstream)
    (gradient,) = torch.autograd.grad(sliced, images, upstream)
    torch.testing.assert_close(gradient, expected)  # the same sums, added in another (fixed) order


def test_trunk_pads_by_slices_only_for_deterministic_training(deterministic_algorithms):
    """PyTorch's reflection padding has no deterministic CUDA backward: with deterministic
    algorithms on, a training step pads by slices; scoring keeps PyTorch's padding (and ONNX's Pad)."""
    model = tao_architecture("Siamese_3", INPUT, 5).build()
    pad = model.cnn1[4]
    assert isinstance(pad, nn.ReflectionPad2d), "TAO's layer (and state_dict) as before"
    features = torch.randn(2, 4, *INPUT[1:], requires_grad=True)
    assert type(pad(features).grad_fn).__name__ == "CatBackward0"
    assert type(pad(features.detach()).grad_fn).__name__ != "CatBackward0"
    torch.use_deterministic_algorithms(False)
    assert type(pad(features).grad_fn).__name__ == "ReflectionPad2DBackward0"
