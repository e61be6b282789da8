"""A model file checked before anything loads it: its card, the threshold it carries, its backend.

Every consumer (``evaluate``, ``inference``, serving, the examples and benchmarks) opens a model
file here once, in the driver, and hands the resulting :class:`ModelFile` on; its
:meth:`ModelFile.load` builds the predictor where the scoring happens (a Ray Data actor, a
Serve replica), from the card alone.

- An ONNX model or TensorRT engine brings its model card, the authority on the input layout
  and the calibrated threshold; the file is checked against the card's SHA-256 (an encrypted
  one is also decrypted in a streaming pass that keeps nothing, which proves the key).
- A ``.pth`` has no card: one is described from what the spec expects, after the checkpoint's
  tensors are checked against that model built on the ``meta`` device (the file is
  memory-mapped, its weights never read).
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from oi_ray.checkpoint import check_fits, load_checkpoint
from oi_ray.crypto import decrypt_into, is_encrypted_file
from oi_ray.decision import CarriedThreshold
from oi_ray.errors import DataError
from oi_ray.fileio import sha256_of
from oi_ray.golden_reuse import GoldenReuse
from oi_ray.model_card import ModelCard, card_path, read_card
from oi_ray.predictors import (
    ONNX_SUFFIXES,
    TENSORRT_SUFFIXES,
    HalvesPredictor,
    Predictor,
    check_halves,
    load_halves_predictor,
    load_predictor,
)
from oi_ray.storage import cached_copy, is_uri

BACKENDS = {".pth": "torch", **dict.fromkeys(ONNX_SUFFIXES, "onnxruntime"),
            **dict.fromkeys(TENSORRT_SUFFIXES, "tensorrt")}


@dataclass(frozen=True)
class ModelFile:
    """A checked model file, its card, the threshold it carries and the key that opens it."""

    path: Path  # the file itself, or the local copy of one in a bucket
    card: ModelCard
    carried: CarriedThreshold
    encryption_key: str | None
    source: str | None = None  # the bucket's URI it was copied from

    @property
    def local_path(self) -> Path:
        """:attr:`path` on this node: a model from a bucket is copied again where its copy is
        missing (a Serve replica or scoring actor on another node than the driver)."""
        if self.source is None or self.path.is_file():
            return self.path
        return cached_copy(self.source)

    @property
    def backend(self) -> str:
        """``onnxruntime``, ``tensorrt`` or ``torch``."""
        return BACKENDS[self.path.suffix]

    @property
    def sha256(self) -> str:
        """The model file's SHA-256 (a checkpoint's when the card describes a ``.pth``)."""
        return self.card.model_sha256 or self.card.source_checkpoint_sha256

    @property
    def name(self) -> str:
        """File name and the first 12 hex digits of its SHA-256: which model answered."""
        return f"{self.path.name}@{self.sha256[:12]}"

    def load(self, use_gpu: bool = False, threads: int | None = None) -> Predictor:
        """The predictor, in the process that scores; ``threads``: ONNX Runtime's intra-op threads."""
        return load_predictor(self.local_path, self.card, self.encryption_key, use_gpu, threads=threads)

    def load_halves(self, use_gpu: bool = False, threads: int | None = None) -> HalvesPredictor:
        """The model's embed and compare halves (:func:`~oi_ray.predictors.load_halves_predictor`)."""
        return load_halves_predictor(self.local_path, self.card, self.encryption_key, use_gpu,
                                     threads=threads)

    @property
    def scores_in_halves(self) -> bool:
        """Whether a split is scored in the model's halves: a checkpoint's network, or an export or
        engine whose card names its halves (one made by an older oi-ray scores whole)."""
        return self.backend == "torch" or bool(self.card.parts)

    def check_halves(self) -> None:
        """In the driver: the halves :attr:`scores_in_halves` will load are there and unchanged."""
        if self.scores_in_halves:
            check_halves(self.path, self.card)

    def load_scorer(self, use_gpu: bool = False, threads: int | None = None) -> Predictor:
        """What scores a split of pairs: the halves with each distinct golden embedded once
        (:class:`~oi_ray.golden_reuse.GoldenReuse`) where :attr:`scores_in_halves`, else the
        whole model."""
        if self.scores_in_halves:
            return GoldenReuse(self.load_halves(use_gpu, threads))
        return self.load(use_gpu, threads)


def open_model_file(path: str | Path, encryption_key: str | None, expected: ModelCard | None, *,
                    checkpoint_digest: bool = False) -> ModelFile:
    """Check the model file at ``path`` without loading it.

    ``expected``: the layout the caller's spec describes (:meth:`ModelCard.expected_by`). A
    ``.pth`` needs it (its card is made from it); an export's own card is checked against it,
    unless it is None (serving, whose spec need not name a dataset). ``checkpoint_digest``: put
    a ``.pth``'s SHA-256 in its card (serving names the model by it), a full read of the file
    that scoring a split does not need (an export's card holds its digest already). A URI
    (``s3://...``) is read from a local copy (:func:`~oi_ray.storage.cached_copy`)."""
    source = str(path) if is_uri(str(path)) else None
    path = cached_copy(str(path))
    if path.suffix not in BACKENDS:
        raise DataError(f"{path}: unknown model file type; expected .pth, .onnx or .engine")
    if path.suffix == ".pth":  # the checkpoint's reader names a missing or foreign file itself
        if expected is None:
            raise ValueError("a .pth checkpoint is checked against the layout its spec expects")
        return dataclasses.replace(_checkpoint_file(path, encryption_key, expected, checkpoint_digest),
                                   source=source)
    if not path.is_file():
        raise DataError(f"model not found: {path}")
    card = read_card(path)
    if expected is not None:
        card.check_matches(expected, path)
    check_model_file(path, card, encryption_key)
    carried = CarriedThreshold(card.threshold, f"the model card {card_path(path)}", card.threshold_rule)
    return ModelFile(path, card, carried, encryption_key, source)


def _checkpoint_file(path: Path, encryption_key: str | None, expected: ModelCard, digest: bool) -> ModelFile:
    checkpoint = load_checkpoint(path, encryption_key)
    check_fits(checkpoint, path, expected.architecture())
    card = dataclasses.replace(expected, threshold=checkpoint.threshold,
                               threshold_rule=checkpoint.threshold_rule, source_checkpoint=str(path),
                               source_checkpoint_sha256=sha256_of(path) if digest else "")
    carried = CarriedThreshold(checkpoint.threshold, f"the checkpoint {path}", checkpoint.threshold_rule)
    return ModelFile(path, card, carried, encryption_key)


def check_model_file(path: Path, card: ModelCard, key: str | None) -> None:
    """Fail with one clear error when the ONNX model or engine at ``path`` is not the file its
    card describes (truncated, corrupt, replaced), or cannot be decrypted with ``key``."""
    encrypted = is_encrypted_file(path)
    if card.model_sha256 is not None:
        if sha256_of(path) != card.model_sha256:
            raise DataError(f"{path} does not match its model card {card_path(path).name} (SHA-256 differs): "
                            f"the file is truncated, corrupt or was replaced; export it again")
    elif not encrypted and path.suffix in ONNX_SUFFIXES:  # a card without the digest (older oi-ray)
        _check_onnx_graph(path)
    if encrypted:
        decrypt_into(path, key, None)


def _check_onnx_graph(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as error:  # onnx raises ValidationError and protobuf decode errors
        raise DataError(f"cannot load ONNX model {path}: {str(error).strip()}") from None
