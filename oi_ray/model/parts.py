"""A model in the two halves a golden library scores with: embed one side, compare two sides.

An AOI line compares thousands of test shots with the same golden. Scoring a pair whole embeds
the golden again every time; in halves, the golden's features are computed once (``embed``)
and every test shot's features are compared with them (``compare``), to the same distance as
the whole pair (tested to 1e-5). Both model types have the two halves: TAO's Siamese models
embed a side into one vector and compare by L2 distance (TAO's own engine outputs per-branch
embeddings), SiameseSpatial embeds each lighting tile into a feature map and compares by the
windowed nearest-feature match.

Each half is its own exported graph (``oi_model.embed.onnx``, ``oi_model.compare.onnx`` beside
``oi_model.onnx``) with a dynamic first axis: a side's pictures for ``embed``, feature rows
for ``compare`` (one per pair for TAO's models, one per lighting tile of each pair for
SiameseSpatial).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

EMBED, COMPARE = "embed", "compare"
PAIRS, FEATURE_ROWS = "batch", "rows"  # the dynamic first axes: pairs (or sides), feature rows
EMBED_INPUTS, COMPARE_INPUTS = ("images",), ("test_features", "golden_features")  # the halves' graph inputs


class _Half(nn.Module):
    """One method of a model as a module of its own (what ``torch.onnx.export`` traces)."""

    def __init__(self, model: nn.Module, method: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.method = method
        # in the model's mode: torch.onnx.export puts a module back into the mode it found it in,
        # and a new module is in training mode, which would switch the model's BatchNorm to it
        self.train(model.training)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.method(*inputs)


@dataclass(frozen=True)
class ModelPart:
    """One half of a model: its module, and the names of its graph's inputs and output."""

    name: str
    module: nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    first_axes: dict[str, str]  # each input's and output's first axis: PAIRS or FEATURE_ROWS

    def examples(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inputs of this half for the pairs whose test (and golden) side is ``images``."""
        if self.name == EMBED:
            return (images,)
        features = self.module.model.embed(images)
        return features, features


def model_parts(model: nn.Module) -> tuple[ModelPart, ModelPart]:
    """The ``embed`` and ``compare`` halves of ``model`` (any registered model type)."""
    return (ModelPart(EMBED, _Half(model, model.embed), EMBED_INPUTS, ("features",),
                      {"images": PAIRS, "features": FEATURE_ROWS}),
            ModelPart(COMPARE, _Half(model, model.compare), COMPARE_INPUTS, ("distance",),
                      {"test_features": FEATURE_ROWS, "golden_features": FEATURE_ROWS, "distance": PAIRS}))


def features_per_pair(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """The features of one pair's side: ``(1, embedding_dim)`` for TAO's models, ``(tiles,
    channels, height, width)`` for SiameseSpatial. ``B`` sides give ``B`` times the first axis.
    (``model`` in eval mode.)"""
    with torch.no_grad():
        return tuple(model.embed(torch.zeros(1, *input_shape)).shape)
