"""The JSON sidecar that travels with an exported model (``<model file>.json``).

It holds everything needed to use the model correctly without the training spec: the input
layout (lighting order, concatenation, image size, mean/std), the decision threshold, where
the model came from, and the model file's own SHA-256. Loaders check it against the spec they
run with, and against the file.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from oi_ray import __version__, storage
from oi_ray.config.schema import ExperimentConfig, ExportConfig
from oi_ray.data.assemble import InputGeometry
from oi_ray.errors import DataError
from oi_ray.fileio import write_atomically
from oi_ray.model.registry import EMBEDDING_OUTPUTS, OUTPUT_MEANINGS, Architecture

CARD_SUFFIX = ".json"
INPUT_NAMES = ("input_1", "input_2")  # TAO's ONNX interface: test side, golden side


@dataclass(frozen=True)
class ModelCard:
    """What an exported model expects and decides."""

    model_type: str
    input_shape: tuple[int, int, int]  # (3, H', W') of each side
    lights: tuple[str, ...]  # input_map order; () = one image per side
    concat_type: str
    grid_map: tuple[int, int] | None  # (x, y) for grid
    image_size: tuple[int, int]  # (height, width) of one lighting image
    rgb_mean: tuple[float, float, float]
    rgb_std: tuple[float, float, float]
    embedding_dim: int
    margin: float
    threshold: float | None  # calibrated on validation data; None: use margin
    batch_size: int  # -1: dynamic batch axis "batch"; else the fixed batch of the trace
    opset_version: int | None  # None: the card describes a checkpoint (.pth), not an export
    oi_ray_version: str
    source_checkpoint: str
    source_checkpoint_sha256: str
    # SHA-256 of the model file as written (its encrypted bytes when encrypted), so a truncated
    # or replaced file is caught without loading it; None in cards of older oi-ray versions.
    model_sha256: str | None = None
    model_options: dict[str, int] = field(default_factory=dict)  # the model type's own (SiameseSpatial)
    output_names: tuple[str, ...] = EMBEDDING_OUTPUTS  # the graph's outputs
    outputs_meaning: str = OUTPUT_MEANINGS[EMBEDDING_OUTPUTS]
    threshold_rule: str | None = None  # how the threshold was calibrated (None: not recorded)
    # the model's halves (oi_ray.model.parts), "embed" and "compare": each one's file name beside
    # the model and SHA-256; {} in cards of older oi-ray versions and of checkpoints
    parts: dict[str, dict[str, str]] = field(default_factory=dict)
    features_per_pair: tuple[int, ...] | None = None  # the shape of one side's features

    @classmethod
    def describe(cls, config: ExperimentConfig, threshold: float | None, *, threshold_rule: str | None = None,
                 **provenance: Any) -> "ModelCard":
        """The card for a model trained with ``config``, deciding with ``threshold`` (calibrated by
        ``threshold_rule``); ``provenance`` fills the rest."""
        dataset = config.dataset
        geometry = InputGeometry.from_config(dataset)
        architecture = Architecture.of(config.model, geometry)
        return cls(
            model_type=config.model.model_type, input_shape=geometry.input_shape,
            lights=tuple(dataset.input_map or ()), concat_type=dataset.concat_type, grid_map=geometry.grid,
            image_size=(geometry.height, geometry.width), rgb_mean=geometry.mean, rgb_std=geometry.std,
            embedding_dim=config.model.embedding_vectors, margin=config.model.margin, threshold=threshold,
            model_options=dict(architecture.options), output_names=architecture.output_names,
            outputs_meaning=architecture.outputs_meaning, threshold_rule=threshold_rule,
            **provenance,
        )

    def architecture(self) -> Architecture:
        """The network this card's model file holds."""
        return Architecture(self.model_type, self.input_shape, self.geometry().tiles, self.embedding_dim,
                            dict(self.model_options))

    def geometry(self) -> InputGeometry:
        """How one side's lighting images become this model's input."""
        height, width = self.image_size
        _, total_height, total_width = self.input_shape
        return InputGeometry(num_lights=(total_height // height) * (total_width // width), height=height,
                             width=width, grid=self.grid_map, mean=self.rgb_mean, std=self.rgb_std)

    @classmethod
    def expected_by(cls, config: ExperimentConfig) -> "ModelCard":
        """The card of a model ``config`` would train, before any file exists: its layout, with
        no threshold and no provenance (a checkpoint's, unexported)."""
        return cls.describe(config, None, batch_size=-1, opset_version=None, oi_ray_version=__version__,
                            source_checkpoint="", source_checkpoint_sha256="")

    def check_matches(self, expected: "ModelCard", model_path: Path) -> None:
        """Refuse a model whose input layout differs from the ``expected`` one (a spec's)."""
        layout = ("model_type", "model_options", "input_shape", "lights", "concat_type", "grid_map",
                  "image_size", "rgb_mean", "rgb_std")
        differences = [f"{name}: model {getattr(self, name)!r}, spec {getattr(expected, name)!r}"
                       for name in layout if getattr(self, name) != getattr(expected, name)]
        if differences:
            raise DataError(f"{model_path} was exported for another input layout than the spec's: "
                            + "; ".join(differences))

    def write(self, model_path: Path) -> Path:
        """Write the card beside ``model_path``; return its path."""
        path = card_path(model_path)
        write_atomically(path, (json.dumps(asdict(self), indent=2) + "\n").encode())
        return path


def export_destination(export: ExportConfig) -> str:
    """Where ``oi-ray export`` writes the ONNX model: ``export.onnx_file``, else
    ``export.results_dir/oi_model.onnx`` (an absolute path, or a URI)."""
    location = export.onnx_file or storage.join(export.results_dir, "oi_model.onnx")
    return location if storage.is_uri(location) else str(Path(storage.local_path(location)).resolve())


def part_path(model_path: Path, part: str) -> Path:
    """``oi_model.onnx`` -> ``oi_model.embed.onnx`` (``part``: one of the model's halves)."""
    return model_path.with_name(f"{model_path.stem}.{part}{model_path.suffix}")


def card_path(model_path: Path) -> Path:
    """``oi_model.onnx`` -> ``oi_model.onnx.json``."""
    return model_path.with_name(model_path.name + CARD_SUFFIX)


def read_card(model_path: Path) -> ModelCard:
    """The card beside ``model_path``, or a clear error when it is missing or unreadable."""
    path = card_path(model_path)
    try:
        fields = json.loads(path.read_text())
        for name in ("input_shape", "lights", "grid_map", "image_size", "rgb_mean", "rgb_std",
                     "output_names", "features_per_pair"):
            if fields.get(name) is not None:
                fields[name] = tuple(fields[name])
        return ModelCard(**fields)
    except FileNotFoundError:
        raise DataError(f"{path} is missing: oi-ray needs the sidecar that `oi-ray export` writes "
                        f"beside {model_path.name}") from None
    except (ValueError, TypeError) as error:
        raise DataError(f"{path} is not an oi-ray model card: {error}") from None
