"""The ``oi-ray`` command line: argument parsing and dispatch only.

``oi-ray <task> -e SPEC.yaml [dotted.key=value ...]`` loads and validates the spec, then calls
``oi_ray.tasks.<task>.run(config)``. ``oi-ray synthesize`` writes a synthetic dataset;
``oi-ray quickstart`` runs the whole workflow on one.
"""

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from oi_ray import __version__
from oi_ray.config.schema import ModelType
from oi_ray.errors import TaskInterrupted, find_user_error

if TYPE_CHECKING:
    from oi_ray.config.schema import ExperimentConfig

SPEC_TASKS = {
    "train": "train a Siamese model on Ray Train (resumes from oi_model_latest.pth)",
    "evaluate": "score dataset.test_dataset and write metrics and plots",
    "inference": "score dataset.infer_dataset and write inference.csv",
    "export": "export a checkpoint to ONNX with TAO's input/output names",
    "gen_trt_engine": "build a TensorRT engine from an exported ONNX model (GPU)",
    "check_dataset": "validate every dataset split of the spec and preview the Ray Data pipeline",
    "pack": "write each split's pairs as Parquet shards of whole pairs (pack.results_dir), for clusters",
    "serve": "score pairs over HTTP with Ray Serve until Ctrl-C (serve.model, default the export)",
    "tune": "sweep spec keys (tune.search_space) with Ray Tune; results.csv and the best model",
}

# tasks that run as a Ray Job on a cluster with --address / --cluster
JOB_TASKS = ("train", "evaluate", "inference", "export", "gen_trt_engine", "tune", "pack")
JOB_VERBS = ("status", "logs", "stop", "list")

OVERRIDES_HELP = (
    "spec overrides in OmegaConf dotlist form, e.g. train.num_epochs=5 "
    "dataset.batch_size=16 'dataset.input_map={WhiteLight: 0}'"
)

log = logging.getLogger("oi_ray")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oi-ray`` console script; returns the exit status."""
    args = _parse(_build_parser(), argv)
    _configure_logging(args.log_level)
    try:
        if args.command == "synthesize":
            return _synthesize(args)
        if args.command == "quickstart":
            return _quickstart(args)
        if args.command == "job":
            from oi_ray.launch.job_commands import run_job_command

            run_job_command(args.verb, args.job_id, args.address, args.follow)
            return 0
        return _run_spec_task(args)
    except KeyboardInterrupt:  # Ctrl-C outside training, which says where a rerun resumes
        if args.debug:
            raise
        print(f"oi-ray {args.command}: interrupted (outputs are written whole or not at all)",
              file=sys.stderr)
        return TaskInterrupted.exit_code
    except Exception as error:  # user errors may arrive wrapped by Ray tasks
        user_error = find_user_error(error)
        if user_error is None or args.debug:
            raise
        kind = "" if isinstance(user_error, TaskInterrupted) else "error: "  # a stop asked for is no error
        print(f"oi-ray {args.command}: {kind}{user_error}", file=sys.stderr)
        return user_error.exit_code


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; spec overrides may come anywhere, also after options (argparse alone
    takes positionals in one run only)."""
    args, extra = parser.parse_known_args(argv)
    overrides = [token for token in extra if "=" in token and not token.startswith("-")]
    unknown = [token for token in extra if token not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oi-ray",
        description="TAO-compatible optical inspection (SiameseOI) on Ray.",
        epilog="Run 'oi-ray <command> --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"oi-ray {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity")
    common.add_argument("--debug", action="store_true",
                        help="show full tracebacks for user errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")

    for task, summary in SPEC_TASKS.items():
        sub = commands.add_parser(task, parents=[common], help=summary, description=summary)
        sub.add_argument("-e", "--experiment_spec_file", "--experiment-spec", dest="spec",
                         required=True, action="append",
                         help="TAO-style experiment spec (YAML, a path or a URI); give several (e.g. a "
                              "dataset spec, then a training recipe from configs/recipes/) and each later "
                              "one's keys win")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
        sub.add_argument("--print-config", action="store_true",
                         help="print the fully resolved spec as YAML and exit")
        if task in (*JOB_TASKS, "serve"):
            where = sub.add_mutually_exclusive_group()
            what = "deploy the service" if task == "serve" else "submit the task as a Ray Job"
            where.add_argument("--address", metavar="URL",
                               help=f"{what} to this cluster's dashboard / job server, e.g. http://head:8265 "
                                    f"(default RAY_ADDRESS when it is such a URL)")
            where.add_argument("--cluster", type=Path, metavar="CLUSTER.yaml",
                               help=f"bring up (or find) the cluster of this Ray cluster-launcher YAML and "
                                    f"{what} to it")
        if task in JOB_TASKS:
            sub.add_argument("--no-wait", action="store_true",
                             help="with --address/--cluster: print the job id and return instead of "
                                  "following its logs")
        if task == "serve":
            sub.add_argument("--build", type=Path, metavar="SERVE_CONFIG.yaml",
                             help="write the Ray Serve config (for `serve deploy` or a KubeRay RayService) "
                                  "instead of serving")
        if task == "tune":
            sub.add_argument("--resume", action="store_true",
                             help="continue the interrupted sweep tune.name: finished trials are kept")

    job = commands.add_parser(
        "job", parents=[common], help="status, logs, stop or list the Ray Jobs oi-ray submitted",
        description="Manage jobs on a cluster's job server (--address, default RAY_ADDRESS).")
    job.add_argument("verb", choices=JOB_VERBS)
    job.add_argument("job_id", nargs="?", help="the submission id (not for list)")
    job.add_argument("--address", metavar="URL", help="the cluster's dashboard / job server, e.g. http://head:8265")
    job.add_argument("--follow", action="store_true", help="logs: follow the job until it ends")

    synth = commands.add_parser(
        "synthesize", parents=[common],
        help="write a synthetic multi-lighting PCB dataset in TAO layout plus a spec",
        description="Write images/, train.csv, val.csv, test.csv and spec.yaml under --output.",
    )
    synth.add_argument("--output", required=True, type=Path, help="dataset directory to create")
    synth.add_argument("--num-pairs", type=int, default=600, help="test/golden pairs (all splits)")
    synth.add_argument("--defect-ratio", type=float, default=0.25, help="fraction of defect pairs")
    synth.add_argument("--lights", default="LowAngleLight,SolderLight,UniformLight,WhiteLight",
                       help="comma-separated lighting names (TAO input_map keys)")
    synth.add_argument("--image-ext", default=".jpg", choices=[".jpg", ".png"],
                       help="image file extension")
    synth.add_argument("--size", type=int, nargs=2, default=(100, 100), metavar=("W", "H"),
                       help="image width and height in pixels")
    synth.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic)")
    synth.add_argument("--overwrite", action="store_true",
                       help="allow writing into a non-empty output directory")

    quick = commands.add_parser(
        "quickstart", parents=[common],
        help="synthetic data -> train -> evaluate -> inference -> ONNX export on an embedded local Ray",
        description="Synthesize a small dataset, train a few epochs, evaluate, run inference and export "
                    "to ONNX; everything goes under --output.",
    )
    quick.add_argument("--output", type=Path, default=Path("oi-ray-quickstart"),
                       help="folder for the data and results (default: ./oi-ray-quickstart)")
    quick.add_argument("--num-pairs", type=int, default=1000, help="synthetic pairs (all splits)")
    quick.add_argument("--epochs", type=int, default=5, help="training epochs")
    quick.add_argument("--model", default=ModelType.SIAMESE_3.value,
                       choices=(ModelType.SIAMESE_3.value, ModelType.SPATIAL.value),
                       help="model.model_type: TAO's Siamese_3 (default) or oi-ray's compact SiameseSpatial")
    quick.add_argument("--overwrite", action="store_true", help="reuse a non-empty --output folder")
    return parser


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_ConsoleFormatter())
    root = logging.getLogger("oi_ray")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _ConsoleFormatter(logging.Formatter):
    """Plain messages for INFO, a level prefix for anything else."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"


def _run_spec_task(args: argparse.Namespace) -> int:
    from oi_ray.config import load_config, to_yaml

    config = load_config(args.spec, args.overrides)
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    if args.command in (*JOB_TASKS, "serve") and (args.cluster or _submitted(args)) \
            and not getattr(args, "build", None):
        _run_on_cluster(args, config)
        return 0
    # Imported on demand: `oi-ray --help` stays fast and only the task's dependencies load.
    task = importlib.import_module(f"oi_ray.tasks.{args.command}")
    if args.command == "serve":
        task.run(config, build=args.build)
    elif args.command == "tune":
        task.run(config, resume=args.resume)
    else:
        task.run(config)
    return 0


def _run_on_cluster(args: argparse.Namespace, config: "ExperimentConfig") -> None:
    """Submit the task as a Ray Job (or deploy the service) to ``--address`` / ``--cluster``."""
    from contextlib import nullcontext

    from oi_ray.launch.jobs import job_server, run_as_job

    if args.cluster:
        from oi_ray.launch.cluster import cluster_job_server

        server = cluster_job_server(args.cluster)
    else:
        server = nullcontext(job_server(args.address))
    with server as address:
        if args.command == "serve":
            from oi_ray.launch.serve_deploy import deploy_to_cluster

            deploy_to_cluster(config, address)
        else:
            options = ["--resume"] if getattr(args, "resume", False) else []
            run_as_job(args.command, config, address, options, wait=not args.no_wait)


def _submitted(args: argparse.Namespace) -> bool:
    """Whether the task goes to a cluster as a Ray Job: --address, or RAY_ADDRESS holding a job
    server URL (inside a job Ray sets it to the cluster's own address, which is not one)."""
    return bool(args.address) or os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://"))


def _synthesize(args: argparse.Namespace) -> int:
    from oi_ray.data import synthetic

    spec = synthetic.SyntheticSpec(
        num_pairs=args.num_pairs,
        defect_ratio=args.defect_ratio,
        lights=tuple(name.strip() for name in args.lights.split(",") if name.strip()),
        image_ext=args.image_ext,
        width=args.size[0],
        height=args.size[1],
        seed=args.seed,
    )
    summary = synthetic.synthesize_dataset(args.output, spec, overwrite=args.overwrite)
    print(summary.describe())
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from oi_ray.quickstart import QuickstartSpec, run_quickstart

    run_quickstart(QuickstartSpec(output=args.output, num_pairs=args.num_pairs, epochs=args.epochs,
                                  model_type=args.model, overwrite=args.overwrite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
