"""TAO's Siamese optical-inspection networks as plain ``nn.Module`` s.

Both branches share one network; ``forward(test, golden)`` returns the two embeddings and
``distance(test, golden)`` the per-pair score (Euclidean distance of the embeddings). Module
names and order match TAO's, so TAO ``state_dict`` s (prefix ``model.`` stripped) load as is:
``cnn1.{1,5,9}`` convolutions, ``cnn1.{3,7,11}`` BatchNorm2d, then ``fc1`` (Siamese_3:
Linear/ReLU/BatchNorm1d x2 + Linear at ``fc1.{0,3,6}``; Siamese_1: Linear/ReLU x2 + Linear at
``fc1.{0,2,4}``).
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from oi_ray.config.schema import ModelType

DISTANCE_EPS = 1e-6  # torch.nn.functional.pairwise_distance's default, as TAO uses it


class ReproducibleReflectionPad2d(nn.ReflectionPad2d):
    """``nn.ReflectionPad2d`` that can train reproducibly on a GPU.

    PyTorch's reflection padding adds its gradients up with atomics on CUDA, in a varying order,
    and has no deterministic variant (``torch.use_deterministic_algorithms`` warns or fails). When
    deterministic algorithms are asked for and the gradient is needed, the same padding is made
    of slices, flips and concatenations, whose gradients add up in a fixed order. Scoring and
    export take PyTorch's own (the ONNX graph keeps its one ``Pad`` node).
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.requires_grad and torch.are_deterministic_algorithms_enabled():
            return reflect_by_slices(images, self.padding)
        return super().forward(images)


def reflect_by_slices(images: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
    """``F.pad(images, padding, mode="reflect")`` built from slices, flips and concatenations."""
    left, right, top, bottom = padding
    for dim, before, after in ((-1, left, right), (-2, top, bottom)):
        size = images.shape[dim]
        images = torch.cat([images.narrow(dim, 1, before).flip(dim), images,
                            images.narrow(dim, size - 1 - after, after).flip(dim)], dim=dim)
    return images


def _trunk() -> nn.Sequential:
    """Three ReflectionPad -> Conv3x3 -> ReLU -> BatchNorm2d blocks, channels 3->4->8->8."""
    layers: list[nn.Module] = []
    for in_channels, out_channels in ((3, 4), (4, 8), (8, 8)):
        layers += [ReproducibleReflectionPad2d(1), nn.Conv2d(in_channels, out_channels, kernel_size=3),
                   nn.ReLU(inplace=True), nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers)


class SiameseNet(nn.Module):
    """Shared trunk + fully connected head; the first Linear sees every pixel of the input."""

    def __init__(self, head: nn.Sequential) -> None:
        super().__init__()
        self.cnn1 = _trunk()
        self.fc1 = head

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """One side: ``(B, 3, H', W')`` assembled inputs -> ``(B, embedding_dim)`` embeddings."""
        return self.fc1(torch.flatten(self.cnn1(images), 1))

    def compare(self, test_embedding: torch.Tensor, golden_embedding: torch.Tensor) -> torch.Tensor:
        """The pair distance ``(B,)`` of two sides' :meth:`embed` outputs."""
        return embedding_distance(test_embedding, golden_embedding)

    def forward(self, test: torch.Tensor, golden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(test), self.embed(golden)

    def distance(self, test: torch.Tensor, golden: torch.Tensor) -> torch.Tensor:
        """Per-pair defect score ``(B,)``: larger means more different from the golden."""
        return self.compare(*self(test, golden))


def embedding_distance(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """TAO's pair distance: ``pairwise_distance`` (L2, eps 1e-6) of two embedding batches."""
    return F.pairwise_distance(first, second, eps=DISTANCE_EPS)


def siamese_3(num_features: int, embedding_dim: int) -> SiameseNet:
    """TAO's Siamese_3: Linear 512, ReLU, BN1d, Linear 512, ReLU, BN1d, Linear E."""
    return SiameseNet(nn.Sequential(
        nn.Linear(num_features, 512), nn.ReLU(inplace=True), nn.BatchNorm1d(512),
        nn.Linear(512, 512), nn.ReLU(inplace=True), nn.BatchNorm1d(512),
        nn.Linear(512, embedding_dim),
    ))


def siamese_1(num_features: int, embedding_dim: int) -> SiameseNet:
    """TAO's Siamese_1: Linear 500, ReLU, Linear 500, ReLU, Linear E (no BatchNorm)."""
    return SiameseNet(nn.Sequential(
        nn.Linear(num_features, 500), nn.ReLU(inplace=True),
        nn.Linear(500, 500), nn.ReLU(inplace=True),
        nn.Linear(500, embedding_dim),
    ))


SIAMESE_MODELS: dict[ModelType, Callable[[int, int], SiameseNet]] = {
    ModelType.SIAMESE_3: siamese_3,
    ModelType.SIAMESE_1: siamese_1,
    ModelType.SIAMESE: siamese_1,  # TAO builds Siamese_1 for any model_type but Siamese_3
}
