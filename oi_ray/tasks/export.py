"""``oi-ray export``: a checkpoint -> ONNX with TAO's interface, verified, plus its model card.

Inputs ``input_1`` (test side) and ``input_2`` (golden side), NCHW float32 of the assembled
input size; outputs ``output_1`` and ``output_2`` (their embeddings) for TAO's models, or
``distance`` (the pair's distance) for SiameseSpatial, as the model card says; batch axis
named ``batch`` (TAO's ``batch_size: -1``) or a fixed batch. Before the file takes its name,
``onnx.checker`` and an ONNX Runtime vs torch comparison must pass, or the command fails. The
comparison runs on the first pairs of the spec's dataset (real inputs keep the embeddings at
their trained scale), or on random pictures when the spec names no dataset; the tolerance is
1e-4 x max(1, largest |output|). The model's two halves (:mod:`oi_ray.model.parts`: one side
-> features, two sides' features -> distance) are written beside it and checked the same way.

Memory: the checkpoint is memory-mapped and its tensors become the model's weights (model built
on the ``meta`` device); the exporter writes into the atomic write's temp file, which the
checker and ONNX Runtime read by path. Only with ``encryption_key`` are the ONNX bytes held in
memory, to verify them before they are encrypted on their way to disk.
"""

import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnxruntime as ort
import torch

from oi_ray import __version__, storage
from oi_ray.checkpoint import load_checkpoint, restore_model
from oi_ray.config import save_resolved_spec
from oi_ray.config.schema import ExperimentConfig, ExportConfig
from oi_ray.console import command
from oi_ray.crypto import protected_output
from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.data.pairs import first_configured_split, load_split
from oi_ray.errors import ConfigError, DataError
from oi_ray.fileio import atomic_output, sha256_of
from oi_ray.model.inputs import InputNormalizer
from oi_ray.model.parts import COMPARE, EMBED, features_per_pair, model_parts
from oi_ray.model.registry import Architecture
from oi_ray.model_card import INPUT_NAMES, ModelCard, export_destination, part_path

log = logging.getLogger(__name__)
DYNAMIC_BATCH = "batch"
VERIFY_BATCH = 4
TOLERANCE = 1e-4  # max |ORT - torch| on the outputs
VERIFICATION_SPLITS = ("validation_dataset", "test_dataset", "train_dataset", "infer_dataset")


def run(config: ExperimentConfig) -> None:
    """Export ``export.checkpoint`` to ``export.onnx_file`` and check the result. A destination
    in a bucket is exported into a local folder first, then uploaded file by file, the model
    card last (a reader checks the model against it)."""
    export = config.export
    if not export.checkpoint:
        raise ConfigError("export.checkpoint is not set: give the .pth to export")
    geometry = InputGeometry.from_config(config.dataset)
    _check_input_size(config, geometry.input_shape)
    destination = export_destination(export)
    if not storage.is_uri(destination):
        _export(config, geometry, Path(destination), destination)
        return
    with tempfile.TemporaryDirectory(prefix="oi-ray-export-") as staging:
        written = _export(config, geometry, Path(staging) / storage.name(destination), destination)
        for path in written:  # the card last
            storage.upload(path, storage.join(storage.parent(destination), path.name))
    log.info("uploaded %s to %s", ", ".join(path.name for path in written), storage.parent(destination))


def _export(config: ExperimentConfig, geometry: InputGeometry, onnx_path: Path,
            destination: str) -> list[Path]:
    """Write the ONNX model, its halves and its card at ``onnx_path`` (``destination`` names
    where they end up); return the files written, the card last."""
    export = config.export
    source = storage.cached_copy(export.checkpoint)
    source_name = export.checkpoint if storage.is_uri(export.checkpoint) else str(source.resolve())
    checkpoint = load_checkpoint(source, config.encryption_key)
    architecture = Architecture.of(config.model, geometry)
    model = restore_model(checkpoint, source, architecture).eval()

    dynamic = export.batch_size == -1
    batch = export.batch_size if export.batch_size > 0 else 1
    test, golden = _verification_inputs(config, geometry, VERIFY_BATCH if dynamic else batch)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    if storage.file_size(destination) is not None:
        log.info("replacing %s", destination)
    parts = write_parts(model, onnx_path, export, test, golden, config.encryption_key)
    with atomic_output(onnx_path) as out:
        difference = _write_verified(model, architecture, export, test, golden, out, config.encryption_key)
    card = ModelCard.describe(
        config, checkpoint.threshold, threshold_rule=checkpoint.threshold_rule, batch_size=export.batch_size,
        opset_version=export.opset_version, oi_ray_version=__version__,
        source_checkpoint=source_name, source_checkpoint_sha256=sha256_of(source),
        model_sha256=sha256_of(onnx_path), parts=parts,
        features_per_pair=features_per_pair(model, geometry.input_shape),
    ).write(onnx_path)
    spec = save_resolved_spec(config, export.results_dir)
    threshold = "none (model.margin decides)" if checkpoint.threshold is None \
        else f"{checkpoint.threshold:.4g}"
    batch_text = f"batch axis '{DYNAMIC_BATCH}'" if dynamic else f"fixed batch {batch}"
    log.info("wrote %s (%s, inputs 2 x %s, %s, opset %d%s); ONNX Runtime matches torch within %.1e; "
             "threshold %s; model card %s", destination, config.model.model_type,
             "x".join(map(str, geometry.input_shape)), batch_text, export.opset_version,
             ", encrypted" if config.encryption_key else "", difference, threshold,
             storage.join(storage.parent(destination), card.name))
    log.info("and its halves for scoring against kept goldens: %s (one side -> features), %s "
             "(features of both sides -> distance)", *(parts[name]["file"] for name in (EMBED, COMPARE)))
    # Its own results folder: the .pth's metrics.json in evaluate.results_dir stays for comparison.
    scored_into = storage.join(storage.parent(destination), "evaluate")
    log.info("score with it: %s", command("evaluate", "-e", spec, f"evaluate.checkpoint={destination}",
                                          f"evaluate.results_dir={scored_into}"))
    return [*(part_path(onnx_path, name) for name in parts), onnx_path, card]


def _write_verified(model: torch.nn.Module, architecture: Architecture, export: ExportConfig,
                    test: torch.Tensor, golden: torch.Tensor, out: BinaryIO, key: str | None) -> float:
    """Export ``model`` into ``out`` (an atomic write's open temp file) and verify what was
    written; return ONNX Runtime's largest difference from torch."""
    batch = export.batch_size if export.batch_size > 0 else 1
    options = {"dynamic": export.batch_size == -1, "opset": export.opset_version,
               "constant_folding": export.do_constant_folding, "verbose": export.verbose}
    if not key:
        write_onnx(model, architecture, batch, out, **options)
        out.flush()
        return verify_onnx(out.name, model, architecture, test, golden)
    onnx_bytes = export_onnx(model, architecture, batch, **options)
    difference = verify_onnx(onnx_bytes, model, architecture, test, golden)
    with protected_output(out, key) as sink:
        sink.write(onnx_bytes)
    return difference


def write_onnx(model: torch.nn.Module, architecture: Architecture, batch: int, out: BinaryIO | str, *,
               dynamic: bool, opset: int, constant_folding: bool, verbose: bool = False) -> None:
    """Write ``model`` (built as ``architecture``) as ONNX with TAO's input names and the
    architecture's output names into ``out`` (a file or path)."""
    example = torch.zeros(batch, *architecture.input_shape)
    output_names = architecture.output_names
    axes = {name: {0: DYNAMIC_BATCH} for name in (*INPUT_NAMES, *output_names)} if dynamic else None
    _trace(model, (example, example), INPUT_NAMES, output_names, out, axes, opset=opset,
           constant_folding=constant_folding, verbose=verbose)


def _trace(module: torch.nn.Module, examples: tuple[torch.Tensor, ...], input_names: tuple[str, ...],
           output_names: tuple[str, ...], out: BinaryIO | str, axes: dict | None, *, opset: int,
           constant_folding: bool, verbose: bool = False) -> None:
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and folding notices
        warnings.simplefilter("ignore")
        # dynamo=False: torch's TorchScript-based exporter needs no onnxscript and exports
        # these plain conv/linear layers exactly.
        torch.onnx.export(module, examples, out, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=constant_folding, verbose=verbose, dynamo=False)


def export_onnx(model: torch.nn.Module, architecture: Architecture, batch: int, *, dynamic: bool,
                opset: int, constant_folding: bool, verbose: bool = False) -> bytes:
    """The ONNX bytes of ``model`` (:func:`write_onnx` in memory)."""
    buffer = io.BytesIO()
    write_onnx(model, architecture, batch, buffer, dynamic=dynamic, opset=opset,
               constant_folding=constant_folding, verbose=verbose)
    return buffer.getvalue()


def verify_onnx(onnx_model: str | bytes, model: torch.nn.Module, architecture: Architecture,
                test: torch.Tensor, golden: torch.Tensor) -> float:
    """Check the graph and compare ONNX Runtime with torch on one batch; return the max error.

    ``onnx_model`` is a path (both read the file themselves) or the model's bytes."""
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise DataError(f"the exported model fails onnx.checker: {error}") from None
    with torch.inference_mode():
        outputs = model(test, golden)
    expected = [output.numpy() for output in (outputs if isinstance(outputs, tuple) else (outputs,))]
    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    actual = session.run(list(architecture.output_names),
                         {INPUT_NAMES[0]: test.numpy(), INPUT_NAMES[1]: golden.numpy()})
    del session  # ONNX Runtime's copy of the weights
    return _checked_difference(actual, expected, "the exported model", ", ".join(architecture.output_names))


def _checked_difference(actual: list[np.ndarray], expected: list[np.ndarray], exported: str,
                        on: str) -> float:
    """The largest |ONNX Runtime - torch| over the outputs, or a DataError beyond TOLERANCE x
    max(1, largest |output|)."""
    difference = max(float(np.abs(a - e).max()) for a, e in zip(actual, expected, strict=True))
    allowed = TOLERANCE * max(1.0, *(float(np.abs(e).max()) for e in expected))
    if not difference <= allowed:
        raise DataError(f"{exported} disagrees with torch: max |difference| {difference:.2e} on {on} "
                        f"(allowed {allowed:.1e}); nothing was written")
    return difference


def write_parts(model: torch.nn.Module, onnx_path: Path, export: ExportConfig, test: torch.Tensor,
                golden: torch.Tensor, key: str | None) -> dict[str, dict[str, str]]:
    """Write the model's two halves beside ``onnx_path`` (``oi_model.embed.onnx``,
    ``oi_model.compare.onnx``; always a dynamic first axis) once ONNX Runtime scores ``test``
    against ``golden`` through them as torch scores the whole pair (else nothing is written);
    return the card's ``parts`` entry: each half's file name and SHA-256."""
    graphs, sessions = {}, {}
    for part in model_parts(model):
        buffer = io.BytesIO()
        _trace(part.module, part.examples(test), part.input_names, part.output_names, buffer,
               {name: {0: axis} for name, axis in part.first_axes.items()}, opset=export.opset_version,
               constant_folding=export.do_constant_folding)
        graphs[part.name] = buffer.getvalue()
        try:
            onnx.checker.check_model(graphs[part.name], full_check=True)
        except onnx.checker.ValidationError as error:
            raise DataError(f"the exported {part.name} half fails onnx.checker: {error}") from None
        sessions[part.name] = ort.InferenceSession(graphs[part.name], providers=["CPUExecutionProvider"])
    embed, compare = sessions[EMBED], sessions[COMPARE]
    features = [embed.run(None, {embed.get_inputs()[0].name: side.numpy()})[0] for side in (test, golden)]
    actual = compare.run(None, dict(zip((entry.name for entry in compare.get_inputs()), features,
                                        strict=True)))[0]
    with torch.inference_mode():
        expected = model.distance(test, golden).numpy()
    _checked_difference([actual], [expected], "the embed half followed by the compare half", "the distance")
    written = {}
    for name, graph in graphs.items():
        path = part_path(onnx_path, name)
        with atomic_output(path) as out, protected_output(out, key) as sink:
            sink.write(graph)
        written[name] = {"file": path.name, "sha256": sha256_of(path)}
    return written


def _verification_inputs(config: ExperimentConfig, geometry: InputGeometry,
                         batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs for the check: the first pairs of a configured split, else random pictures."""
    normalize = InputNormalizer(geometry)
    split = first_configured_split(config.dataset, VERIFICATION_SPLITS)
    if split is not None:
        table = load_split(config.dataset, split, require_labels=False)
        tests, goldens = table.sides([index % len(table) for index in range(batch)])
        return normalize(read_pictures(tests, geometry)), normalize(read_pictures(goldens, geometry))
    generator = np.random.default_rng(0)
    _, height, width = geometry.input_shape
    return tuple(normalize(generator.integers(0, 256, (batch, height, width, 3), dtype=np.uint8))
                 for _ in range(2))


def _check_input_size(config: ExperimentConfig, input_shape: tuple[int, int, int]) -> None:
    _, height, width = input_shape
    export = config.export
    problems = [f"export.{name}={value} contradicts the assembled input {expected} "
                f"(from dataset.image_{name.split('_')[1]}, num_input and concat_type)"
                for name, value, expected in (("input_height", export.input_height, height),
                                              ("input_width", export.input_width, width))
                if value is not None and value != expected]
    if problems:
        raise ConfigError("; ".join(problems))
