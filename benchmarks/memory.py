"""Peak driver memory of resume, export and evaluate's checks at TAO's default model size,
side by side with a plain ``torch.load`` + ``torch.save`` of the same checkpoint.

TAO's documented layout (4 lightings at 100x100, linear) gives Siamese_3 inputs of 3x400x100
and a 320,000 -> 512 first layer: 164 M weights. The checkpoint holds them with Adam's two
moments after one optimizer step, as training writes it (about 1.9 GiB). Each measurement runs
in a fresh Python process and reports that process's own peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``; Ray's processes are children and would not count, but
none of these steps starts Ray):

- resume: the real ``oi-ray train`` with ``train.num_epochs`` equal to the checkpoint's epoch,
  which checks the checkpoint and stops with "training already complete" before any worker;
- export: the real ``oi-ray export`` (it runs entirely in the driver), ONNX verification included;
- evaluate checks: what evaluate and inference do before Ray starts, ``open_model_file`` on
  the ``.pth`` and on the exported ``.onnx``;
- baseline: ``torch.save(torch.load(checkpoint), copy)``.

Target: each step <= 1.5 x the baseline.

    python benchmarks/memory.py
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1 << 20
LIGHTS = ("LowAngleLight", "SolderLight", "UniformLight", "WhiteLight")
TARGET = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100, help="lighting image size (TAO's docs: 100)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the files go (default: a temp folder)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](*args.child[1:])))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        _measure(Path(tmp), args.size)


def _measure(folder: Path, size: int) -> None:
    from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset

    spec = synthesize_dataset(folder / "data", SyntheticSpec(num_pairs=20, lights=LIGHTS, width=size,
                                                            height=size, seed=0)).spec_path
    checkpoint, onnx_file = folder / "tao_size.pth", folder / "export/tao_size.onnx"
    _run("build", str(spec), str(checkpoint))
    rows = {
        "baseline: torch.load + torch.save": _run("baseline", str(checkpoint), str(folder / "copy.pth")),
        "resume (oi-ray train, already complete)": _run("resume", str(spec), str(checkpoint)),
        "export (oi-ray export)": _run("export", str(spec), str(checkpoint), str(onnx_file)),
        "evaluate checks (.pth and .onnx)": _run("checks", str(spec), str(checkpoint), str(onnx_file)),
    }
    checkpoint_mib = checkpoint.stat().st_size / MIB
    baseline = rows["baseline: torch.load + torch.save"]["peak_mib"]
    print(f"Siamese_3, 4 lightings at {size}x{size} (inputs 3x{4 * size}x{size}); checkpoint with Adam state "
          f"{checkpoint_mib:.0f} MiB, ONNX {onnx_file.stat().st_size / MIB:.0f} MiB")
    print(f"{'step':<42}{'peak RSS':>12}{'x checkpoint':>14}{'x baseline':>12}")
    for name, row in rows.items():
        peak = row["peak_mib"]
        print(f"{name:<42}{peak:>8.0f} MiB{peak / checkpoint_mib:>14.2f}{peak / baseline:>12.2f}")
    worst = max(row["peak_mib"] for row in rows.values()) / baseline
    print(f"largest ratio to the baseline: {worst:.2f} (target <= {TARGET})")


def _run(child: str, *arguments: str) -> dict:
    """Run ``child`` in a fresh interpreter; its last stdout line is its JSON report."""
    done = subprocess.run([sys.executable, __file__, "--child", child, *arguments], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{child} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak() -> dict:
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB}  # Linux: KiB


def _build(spec: str, checkpoint: str) -> dict:
    """A TAO-size Siamese_3 after one Adam step, saved as ``oi-ray train`` saves it."""
    import torch

    from oi_ray.checkpoint import Checkpoint, save_checkpoint
    from oi_ray.config import load_config, to_yaml
    from oi_ray.data.assemble import InputGeometry
    from oi_ray.model.loss import contrastive_loss
    from oi_ray.model.siamese import build_model

    config = load_config(spec)
    shape = InputGeometry.from_config(config.dataset).input_shape
    torch.manual_seed(0)
    model = build_model("Siamese_3", shape, config.model.embedding_vectors)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.optim.lr)
    distance = model.distance(torch.randn(2, *shape), torch.randn(2, *shape))
    contrastive_loss(distance, torch.tensor([0.0, 1.0]), config.model.margin).backward()
    optimizer.step()
    save_checkpoint(Checkpoint(model.state_dict(), epoch=1, optimizer_state=optimizer.state_dict(),
                               config_yaml=to_yaml(config), threshold=0.5, model_type="Siamese_3",
                               input_shape=shape, embedding_dim=config.model.embedding_vectors), checkpoint)
    return _peak()


def _baseline(checkpoint: str, copy: str) -> dict:
    import torch

    torch.save(torch.load(checkpoint, weights_only=True), copy)
    return _peak()


def _resume(spec: str, checkpoint: str) -> dict:
    from oi_ray.cli import main as oi_ray

    results = Path(checkpoint).parent / "train"
    code = oi_ray(["train", "-e", spec, f"train.results_dir={results}", "train.num_epochs=1",
                   f"train.resume_training_checkpoint_path={checkpoint}"])
    if code != 0 or (results / "status.json").exists():
        raise SystemExit("oi-ray train was expected to stop with 'training already complete'")
    return _peak()


def _export(spec: str, checkpoint: str, onnx_file: str) -> dict:
    from oi_ray.cli import main as oi_ray

    code = oi_ray(["export", "-e", spec, f"export.checkpoint={checkpoint}", f"export.onnx_file={onnx_file}",
                   f"export.results_dir={Path(onnx_file).parent}"])
    if code != 0:
        raise SystemExit("oi-ray export failed")
    return _peak()


def _checks(spec: str, checkpoint: str, onnx_file: str) -> dict:
    from oi_ray.config import load_config
    from oi_ray.model_card import ModelCard
    from oi_ray.model_file import open_model_file

    config = load_config(spec)
    expected = ModelCard.expected_by(config)
    thresholds = [open_model_file(path, config.encryption_key, expected).carried.value
                  for path in (checkpoint, onnx_file)]
    if thresholds != [0.5, 0.5]:
        raise SystemExit(f"unexpected thresholds {thresholds}")
    return _peak()


CHILDREN = {"build": _build, "baseline": _baseline, "resume": _resume, "export": _export, "checks": _checks}

if __name__ == "__main__":
    main()
