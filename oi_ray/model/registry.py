"""Which network a spec or a model file asks for, and building it.

An :class:`Architecture` is everything that decides a model's layers: the model type, the
assembled input, how its lighting tiles are laid out, and the type's own options. It is built
from the spec (training, checking a ``.pth``) or from an exported model's card, and stored with
every checkpoint and card, so a file is never loaded into a network it was not trained as.

Two kinds of model: TAO's Siamese_3 / Siamese_1 return the two embeddings (exported as
``output_1`` and ``output_2``; the distance is their L2 distance), SiameseSpatial returns the
distance itself (exported as ``distance``). Every model has ``distance(test, golden)``.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from oi_ray.config.schema import ExperimentConfig, ModelConfig, ModelType
from oi_ray.data.assemble import InputGeometry
from oi_ray.model.siamese import SIAMESE_MODELS, embedding_distance
from oi_ray.model.spatial import SiameseSpatial

EMBEDDING_OUTPUTS = ("output_1", "output_2")  # TAO's: the test and golden embeddings
OUTPUT_MEANINGS = {  # as model cards explain the outputs
    EMBEDDING_OUTPUTS: "the test and golden embeddings (batch, embedding_dim); the pair's distance is "
                       "their L2 distance",
    SiameseSpatial.output_names: "the pair's distance (batch,): the largest per-position distance between "
                                 "the sides' feature maps; > threshold is a defect",
}


@dataclass(frozen=True)
class Architecture:
    """What decides a model's layers."""

    model_type: str
    input_shape: tuple[int, int, int]  # (3, H', W') of each side
    tiles: tuple[int, int]  # (rows, columns) of lighting images in each input
    embedding_dim: int  # TAO models' embedding size
    options: dict[str, int] = field(default_factory=dict)  # SiameseSpatial's model.spatial values

    @classmethod
    def of(cls, model: ModelConfig, geometry: InputGeometry) -> "Architecture":
        """The spec's model (``model`` section) for inputs assembled as ``geometry``."""
        options = asdict(model.spatial) if model.model_type == ModelType.SPATIAL else {}
        return cls(model.model_type, geometry.input_shape, geometry.tiles, model.embedding_vectors, options)

    @classmethod
    def of_spec(cls, config: ExperimentConfig) -> "Architecture":
        """The model a whole spec describes."""
        return cls.of(config.model, InputGeometry.from_config(config.dataset))

    @property
    def output_names(self) -> tuple[str, ...]:
        """The exported graph's outputs."""
        return SiameseSpatial.output_names if self.model_type == ModelType.SPATIAL else EMBEDDING_OUTPUTS

    @property
    def outputs_meaning(self) -> str:
        """What the exported outputs hold, in words."""
        return OUTPUT_MEANINGS[self.output_names]

    def build(self) -> nn.Module:
        """A freshly initialised network (on torch's current default device)."""
        if self.model_type == ModelType.SPATIAL:
            return SiameseSpatial(self.tiles, **self.options)
        _, height, width = self.input_shape
        trunk_channels = 8
        return SIAMESE_MODELS[self.model_type](trunk_channels * height * width, self.embedding_dim)

    def describe(self) -> str:
        """E.g. ``SiameseSpatial (stride 2, neighbourhood 3, width 32, blocks 2, features 16) with input
        3x200x100``."""
        return describe_model(self.model_type, self.input_shape, self.options)


def describe_model(model_type: str, input_shape: tuple[int, ...], options: dict[str, int], *,
                   as_noun: bool = False) -> str:
    """A model's identity in words, as errors name it: ``Siamese_3 with input 3x32x16``, or with
    ``as_noun`` ``a SiameseSpatial model (stride 2, neighbourhood 3, width 32, blocks 2, features 16)
    with input 3x32x16``."""
    listed = f" ({', '.join(f'{name} {value}' for name, value in options.items())})" if options else ""
    shape = f"with input {'x'.join(map(str, input_shape))}"
    return f"a {model_type} model{listed} {shape}" if as_noun else f"{model_type}{listed} {shape}"


def distance_from_outputs(outputs: list[Any] | tuple[Any, ...]) -> np.ndarray:
    """Per-pair distances from an exported model's outputs: the ``distance`` output itself, or
    the L2 distance of the two embeddings."""
    if len(outputs) == 1:
        return np.asarray(torch.as_tensor(outputs[0]).float().cpu()).reshape(-1)
    first, second = (torch.as_tensor(output) for output in outputs)
    return embedding_distance(first, second).float().cpu().numpy()
