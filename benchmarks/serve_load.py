"""`oi-ray serve` under load vs in-process ONNX Runtime on the same pairs, side by side, with
goldens uploaded in every request and with goldens registered once in the golden library.

TAO's layout (4 lightings of 100x100 JPEG per side) from the synthetic generator; each model
(``--models``: Siamese_3 and SiameseSpatial, each with its recipe) trained for one epoch and
exported with `oi-ray export`. Then, in one run, for each model:

1. in-process: the model's own time per call at batch 1 and at the service's batch size (the
   whole pair, and the halves a ``golden_id`` pair runs: embed one side, compare with kept
   features; median of 9), then the service's own decoding (``decode_pairs``) and ONNX Runtime
   predictor, no HTTP: pairs/s at batch 1 and at the service's batch size;
2. served: `oi-ray serve` in its own process (its embedded Ray, 127.0.0.1 only). First one
   client, alternating a request with the same pair scored in-process, so both latencies are
   measured under the same conditions; then 1, 8 and 32 concurrent clients posting
   single-pair multipart requests (keep-alive HTTP/1.1), each level a fixed number of
   requests bounded by a time limit;
3. the golden library (``serve.golden_store``): every distinct golden of the pairs registered
   once (``PUT /v1/goldens/{id}``); one client alternating a pair that uploads its golden with
   the same pair naming it (``golden_id``), then 32 clients posting ``golden_id`` pairs;
   then both kinds again with a board's pairs per request (``BOARD`` pairs, as an AOI program
   sends a field of view): one client alternating, and 32 clients;
4. in-process again once the service has stopped, so a drifting machine shows.

Ratios: served pairs/s at 32 clients over in-process pairs/s at the service's batch size
(target >= 0.5), the served p50 latency of one pair minus the in-process p50 latency of
one pair, alternated (the serving overhead; target <= 10 ms); pairs/s at 32 clients with
``golden_id`` over uploaded goldens (target >= 1.8) and the p50 latency of one ``golden_id``
pair over one uploaded pair, alternated (target <= 0.6); the same two with a board per request.

    python benchmarks/serve_load.py [--workdir DIR] [--requests 200 400 800] [--models Siamese_3]
"""

import argparse
import functools
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from oi_ray.cli import main as oi_ray
from oi_ray.config import load_config
from oi_ray.data.pairs import PairTable, load_split
from oi_ray.model_file import open_model_file
from oi_ray.predictors import HalvesPredictor
from oi_ray.serving.uploads import PairUpload, decode_pairs

CLIENTS = (1, 8, 32)
PORT = 18731
SERVE_CPUS = 2  # replica CPUs: ONNX Runtime threads, as in-process
BATCH = 32
TIME_LIMIT_S = 90.0  # per load level
ALTERNATED = 150  # single pairs scored served and in-process in turns
BOARD = 8  # pairs per request in the board levels
RECIPES = Path(__file__).resolve().parent.parent / "configs" / "recipes"
MODELS = {"Siamese_3": RECIPES / "siamese_3.yaml", "SiameseSpatial": RECIPES / "siamese_spatial.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="reuse a dataset and model from an earlier run")
    parser.add_argument("--requests", type=int, nargs=3, default=(200, 400, 800),
                        help="requests at 1, 8 and 32 clients (32 clients naming goldens: the last)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    if args.workdir:
        _compare(args, args.workdir.resolve())
        return
    with tempfile.TemporaryDirectory(prefix="oi-ray-serve-load-") as folder:  # a 600 MB model
        _compare(args, Path(folder))


def _compare(args: argparse.Namespace, workdir: Path) -> None:
    """Per model: in-process, served, in-process again; then the ratios."""
    spec = _dataset(workdir)
    for model in args.models:
        recipe, results = MODELS[model], workdir / model
        onnx = _model(spec, recipe, results)
        config = load_config(spec, [f"results_dir={results}"])
        table = load_split(config.dataset, "test_dataset")
        lights = tuple(config.dataset.input_map)
        pairs = [PairUpload(str(row), _contents(table.test_paths[row]), _contents(table.golden_paths[row]))
                 for row in range(len(table))]
        print(f"\n== {model}: {len(pairs)} pairs of {len(lights)} x {config.dataset.image_width}x"
              f"{config.dataset.image_height} JPEG per side, {len(set(_golden_ids(table)))} goldens; model "
              f"{onnx}; {os.cpu_count()} cores", flush=True)
        _model_work(onnx, pairs, lights)
        before = _in_process(onnx, pairs, lights)
        served = _served([spec, recipe], results, onnx, pairs, _golden_ids(table), lights, args.requests)
        after = _in_process(onnx, pairs, lights)
        _report(model, before, served, after)


def _report(model: str, before: dict, served: dict, after: dict) -> None:
    print(f"\n{model} in-process (decode + ONNX Runtime, {SERVE_CPUS} threads), before | after the load:")
    for key, unit in (("batch1", "pairs/s at batch 1"), (f"batch{BATCH}", f"pairs/s at batch {BATCH}")):
        print(f"  {before[key]:9.2f} | {after[key]:9.2f}  {unit}")
    alternated, named = served.pop("alternated"), served.pop("named")
    print(f"\none pair at a time, alternated ({ALTERNATED} each): served p50 {alternated['served']:.2f} ms, "
          f"in-process p50 {alternated['in_process']:.2f} ms")
    print(f"one pair at a time, alternated ({ALTERNATED} each): golden uploaded p50 "
          f"{named['uploaded']:.2f} ms, golden_id p50 {named['golden_id']:.2f} ms")
    boards = served.pop("named_board")
    print(f"one board of {BOARD} pairs at a time, alternated ({ALTERNATED} each): golden uploaded p50 "
          f"{boards['uploaded']:.2f} ms, golden_id p50 {boards['golden_id']:.2f} ms")
    print(f"\n{model} served (oi-ray serve, multipart requests; p50 and p99 of a request):")
    print(f"  {'golden':>8} {'pairs/request':>13} {'clients':>7} {'requests':>8} {'pairs/s':>9} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for (golden, per_request, clients), level in served.items():
        print(f"  {golden:>8} {per_request:>13} {clients:>7} {level['requests']:>8} {level['rate']:>9.1f} "
              f"{level['p50']:>8.2f} {level['p99']:>8.2f} {level['errors']:>6}")
    in_process_rate = (before[f"batch{BATCH}"] + after[f"batch{BATCH}"]) / 2
    uploaded, by_id = served[("uploaded", 1, 32)], served[("id", 1, 32)]
    print(f"\n{model}: ratio served pairs/s at 32 clients / in-process pairs/s at batch {BATCH}: "
          f"{uploaded['rate'] / in_process_rate:.2f} (target >= 0.5)")
    print(f"{model}: serving overhead of one pair: {alternated['served'] - alternated['in_process']:.2f} ms "
          f"(target <= 10)")
    print(f"{model}: golden_id / uploaded golden, pairs/s at 32 clients: "
          f"{by_id['rate'] / uploaded['rate']:.2f} (target >= 1.8); p50 of one pair, alternated: "
          f"{named['golden_id'] / named['uploaded']:.2f} "
          f"(target <= 0.6)")
    print(f"{model}: the same with {BOARD} pairs per request: pairs/s at 32 clients "
          f"{served[('id', BOARD, 32)]['rate'] / served[('uploaded', BOARD, 32)]['rate']:.2f}; p50 of one "
          f"board, alternated: {boards['golden_id'] / boards['uploaded']:.2f}", flush=True)


def _golden_ids(table: PairTable) -> list[str]:
    """A golden id per row: its golden's folder and part (``golden/P100`` + ``R80@1`` -> ``P100-R80-1``)."""
    return [f"{Path(paths[0]).parent.name}-{Path(paths[0]).name.split('_')[0].replace('@', '-')}"
            for paths in table.golden_paths]


def _contents(paths: list[str]) -> tuple[bytes, ...]:
    return tuple(Path(path).read_bytes() for path in paths)


def _dataset(workdir: Path) -> Path:
    """Synthetic TAO-layout data (reused when present): its spec."""
    spec = workdir / "data" / "spec.yaml"
    if not spec.is_file() and oi_ray(["synthesize", "--output", str(workdir / "data"), "--num-pairs", "240",
                                      "--seed", "3"]) != 0:
        raise SystemExit("oi-ray synthesize failed")
    return spec


def _model(spec: Path, recipe: Path, results: Path) -> Path:
    """One epoch of training with ``recipe`` and the ONNX export (reused when present)."""
    onnx = results / "export" / "oi_model.onnx"
    if onnx.is_file():
        return onnx
    common = ["-e", str(spec), "-e", str(recipe), f"results_dir={results}"]
    for step in (["train", *common, "train.num_epochs=1"], ["export", *common]):
        if oi_ray(step) != 0:
            raise SystemExit(f"oi-ray {step[0]} failed")
    return onnx


class InProcess:
    """The service's decoding and predictor in this process: what serving adds overhead to."""

    def __init__(self, onnx: Path, lights: tuple[str, ...]) -> None:
        model = open_model_file(onnx, None, None)
        self.geometry = model.card.geometry()
        self.lights = lights
        self.model = model
        self.predictor = model.load(threads=SERVE_CPUS)

    @functools.cached_property
    def halves(self) -> HalvesPredictor:
        """The model's embed and compare halves, loaded when first asked for."""
        return self.model.load_halves(threads=SERVE_CPUS)

    def decode(self, chunk: list[PairUpload]) -> tuple[np.ndarray, np.ndarray]:
        return decode_pairs(chunk, self.geometry, self.lights, allow_resize=True)

    def score(self, chunk: list[PairUpload]) -> None:
        self.predictor.distances(*self.decode(chunk))


def _model_work(onnx: Path, pairs: list[PairUpload], lights: tuple[str, ...]) -> None:
    """Print the model's own time per call, in-process (median of 9): the whole pair, and the
    halves a golden_id pair runs (embed the test side, compare with kept features)."""
    local = InProcess(onnx, lights)
    for batch in (1, BATCH):
        test, golden = local.decode(pairs[:batch])
        whole = _median_ms(local.predictor.distances, test, golden)
        embed = _median_ms(local.halves.embed, test)
        compare = _median_ms(local.halves.compare, local.halves.embed(test), local.halves.embed(golden))
        print(f"  model work at batch {batch:>2}: whole pair {whole:.2f} ms, embed one side {embed:.2f} ms, "
              f"compare {compare:.2f} ms; whole pair / (embed + compare) = {whole / (embed + compare):.2f}",
              flush=True)


def _median_ms(call, *args: np.ndarray) -> float:
    times = []
    for _ in range(9):
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _in_process(onnx: Path, pairs: list[PairUpload], lights: tuple[str, ...]) -> dict[str, float]:
    score = InProcess(onnx, lights).score
    score(pairs[:BATCH])  # warm-up
    result = {}
    for batch in (1, BATCH):
        start = time.perf_counter()
        chunks = [pairs[i:i + batch] for i in range(0, len(pairs), batch)]
        for chunk in chunks:
            score(chunk)
        result[f"batch{batch}"] = len(pairs) / (time.perf_counter() - start)
    return result


def _served(specs: list[Path], results: Path, onnx: Path, pairs: list[PairUpload], golden_ids: list[str],
            lights: tuple[str, ...], counts: tuple[int, int, int]) -> dict:
    bodies = [_multipart([pair], lights) for pair in pairs]
    named_pairs = [PairUpload(pair.id, pair.test, (), golden_id)
                   for pair, golden_id in zip(pairs, golden_ids, strict=True)]
    named = [_multipart([pair], lights) for pair in named_pairs]
    board_bodies, named_boards = ([_multipart(group[start:start + BOARD], lights)
                                   for start in range(0, len(group) - BOARD + 1, BOARD)]
                                  for group in (pairs, named_pairs))
    log = (results / "serve.log").open("w")
    store = results / "goldens"
    process = subprocess.Popen(
        [sys.executable, "-m", "oi_ray.cli", "serve", *(arg for spec in specs for arg in ("-e", str(spec))),
         f"results_dir={results}", f"serve.port={PORT}", f"serve.num_cpus={SERVE_CPUS}",
         f"serve.batching.max_batch_size={BATCH}", f"serve.max_ongoing_requests={2 * BATCH}",
         "serve.max_queued_requests=-1", f"serve.golden_store={store}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(process)
        _post_all(bodies[:BATCH], clients=4, limit=len(bodies[:BATCH]))  # warm-up
        results_by_level: dict = {"alternated": _alternated(InProcess(onnx, lights), pairs, bodies)}
        results_by_level.update({("uploaded", 1, clients): _load(bodies, clients, count)
                                 for clients, count in zip(CLIENTS, counts, strict=True)})
        _register(pairs, golden_ids, lights)
        _post_all(named[:BATCH], clients=4, limit=len(named[:BATCH]))  # warm-up
        results_by_level["named"] = _alternated_named(bodies, named)
        results_by_level[("id", 1, CLIENTS[-1])] = _load(named, CLIENTS[-1], counts[-1])
        results_by_level["named_board"] = _alternated_named(board_bodies, named_boards)
        for golden, boards in (("uploaded", board_bodies), ("id", named_boards)):
            results_by_level[(golden, BOARD, CLIENTS[-1])] = _load(boards, CLIENTS[-1], counts[-1] // 4,
                                                                   pairs_per_request=BOARD)
        return results_by_level
    finally:
        os.killpg(process.pid, signal.SIGINT)  # the process group this benchmark started
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
        time.sleep(10)  # let the stopped Ray's processes exit before measuring again


def _register(pairs: list[PairUpload], golden_ids: list[str], lights: tuple[str, ...]) -> None:
    """``PUT /v1/goldens/{id}`` once for every distinct golden."""
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)
    for golden_id, pair in dict(zip(golden_ids, pairs, strict=True)).items():
        body, content_type = _multipart([PairUpload(None, (), pair.golden)], lights)
        connection.request("PUT", f"/v1/goldens/{golden_id}", body=body,
                           headers={"Content-Type": content_type})
        response = connection.getresponse()
        if response.status != 201:
            raise SystemExit(f"HTTP {response.status} registering {golden_id}: {response.read()[:200]!r}")
        response.read()
    connection.close()


def _alternated_named(bodies: list[tuple[bytes, str]], named: list[tuple[bytes, str]]) -> dict[str, float]:
    """p50 latency of one request, its goldens uploaded and named by id, measured in turns."""
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    times: dict[str, list[float]] = {"uploaded": [], "golden_id": []}
    for index in range(ALTERNATED):
        for kind, requests in (("uploaded", bodies), ("golden_id", named)):
            times[kind].append(_post(connection, *requests[index % len(requests)]))
    connection.close()
    return {name: 1000 * float(np.median(values)) for name, values in times.items()}


def _post(connection: http.client.HTTPConnection, body: bytes, content_type: str) -> float:
    """One ``POST /v1/inspect`` that must be answered 200: its latency in seconds."""
    start = time.perf_counter()
    connection.request("POST", "/v1/inspect", body=body, headers={"Content-Type": content_type})
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status} from the service")
    return time.perf_counter() - start


def _alternated(local: InProcess, pairs: list[PairUpload],
                bodies: list[tuple[bytes, str]]) -> dict[str, float]:
    """p50 latency of one pair, served and in-process, measured in turns on the same pairs."""
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    times: dict[str, list[float]] = {"served": [], "in_process": []}
    for index in range(ALTERNATED):
        times["served"].append(_post(connection, *bodies[index % len(bodies)]))
        start = time.perf_counter()
        local.score([pairs[index % len(pairs)]])
        times["in_process"].append(time.perf_counter() - start)
    connection.close()
    return {name: 1000 * float(np.median(values)) for name, values in times.items()}


def _multipart(pairs: list[PairUpload], lights: tuple[str, ...]) -> tuple[bytes, str]:
    """A form of the pairs' fields: ids, golden_ids and images, each only when a pair has them;
    with several pairs every field name starts with the pair's index (``0.test.WhiteLight``)."""
    boundary = uuid.uuid4().hex
    parts = []
    for index, pair in enumerate(pairs):
        prefix = f"{index}." if len(pairs) > 1 else ""
        for name, value in (("id", pair.id), ("golden_id", pair.golden_id)):
            if value is not None:
                parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{prefix}{name}"\r\n\r\n'
                             f'{value}\r\n'.encode())
        for side in [side for side in ("test", "golden") if getattr(pair, side)]:
            for light, data in zip(lights, getattr(pair, side), strict=True):
                header = (f'--{boundary}\r\nContent-Disposition: form-data; name="{prefix}{side}.{light}"; '
                          f'filename="{light}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n')
                parts.append(header.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _wait_healthy(process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("oi-ray serve exited; see serve.log in the workdir")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("oi-ray serve did not become healthy")


def _load(bodies: list[tuple[bytes, str]], clients: int, count: int, *,
          pairs_per_request: int = 1) -> dict[str, float]:
    """``count`` requests from ``clients`` clients: answered pairs/s, request latencies, errors."""
    start = time.perf_counter()
    latencies, errors = _post_all(bodies, clients, count)
    wall = time.perf_counter() - start
    return {"requests": len(latencies) + errors, "rate": pairs_per_request * len(latencies) / wall,
            "errors": errors,
            "p50": 1000 * float(np.percentile(latencies, 50)),
            "p99": 1000 * float(np.percentile(latencies, 99))}


def _post_all(bodies: list[tuple[bytes, str]], clients: int, limit: int) -> tuple[list[float], int]:
    """``limit`` requests from ``clients`` threads, each with its own keep-alive connection;
    stops early at the time limit. Returns the latencies of answered requests and the errors."""
    issued = iter(range(limit))
    lock = threading.Lock()
    deadline = time.monotonic() + TIME_LIMIT_S
    latencies: list[float] = []
    errors = 0

    def client() -> None:
        nonlocal errors
        connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                index = next(issued, None)
            if index is None:
                break
            body, content_type = bodies[index % len(bodies)]
            start = time.perf_counter()
            connection.request("POST", "/v1/inspect", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            response.read()
            with lock:
                if response.status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
        connection.close()

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return latencies, errors


if __name__ == "__main__":
    main()
