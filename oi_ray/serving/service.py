"""The Ray Serve deployment: the inspection HTTP API in front of one predictor per replica.

Routes (under the application's route prefix):

- ``POST /v1/inspect``: pairs in (see :mod:`oi_ray.serving.uploads`), one answer per pair out:
  ``{"model", "results": [{"id", "distance", "decision", "threshold", "model"}]}``; a pair that
  names a registered golden (``golden_id``) also gets ``golden_id`` and ``golden_shot``, the
  golden set's shot nearest to its test (the smallest distance decides).
- ``PUT /v1/goldens/{id}``, ``GET /v1/goldens`` (``?after=<id>&limit=<n>``), ``GET`` and
  ``DELETE /v1/goldens/{id}``: the golden library (``serve.golden_store``,
  :mod:`oi_ray.serving.library`).
- ``GET /v1/model``: the model card, the threshold in force and where it comes from.
- ``GET /healthz``: 200 while this replica's model scores; names the replica.

A request is read (bounded by ``max_request_bytes``), parsed and decoded in a worker thread,
so the event loop keeps accepting requests; its pairs join ``@serve.batch`` batches with other
requests' pairs, and each batch is one model call (pairs that name a registered golden join
batches of their own: one ``embed`` call for the test sides, one ``compare`` call). Serve
forms the next batch while the current one runs, from the pairs arriving within
``batch_wait_timeout_s``; so that the pairs arriving during a model call form one batch
instead of many small ones, requests wait for the model to be idle before they join a batch
(the wait costs nothing when it is idle). The threshold lives in ``user_config``: a redeploy
that changes only it reaches the running replicas through :meth:`InspectionService.reconfigure`.
Errors are JSON bodies with a stable ``code``; a request never takes the replica down.
"""

import asyncio
import hmac
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from oi_ray.decision import NO_PASS, DecisionThreshold, choose_threshold, decisions
from oi_ray.model_file import ModelFile
from oi_ray.serving.golden_stats import GoldenStats
from oi_ray.serving.goldens import GoldenIdError, GoldenStore, check_golden_id
from oi_ray.serving.library import GoldenLibrary, KeptGolden
from oi_ray.serving.uploads import (
    PairUpload,
    RequestError,
    UploadLayout,
    decode_pairs,
    golden_from_form,
    golden_from_json,
    pairs_from_form,
    pairs_from_json,
)

log = logging.getLogger(__name__)
DEPLOYMENT_NAME = "InspectionService"
THRESHOLD_KEY = "threshold"  # the user_config entry
THRESHOLD_OVERRIDE = "serve.threshold (user_config)"
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
DRAIN_LIMIT_BYTES = 256 * 2**20  # read and dropped of an oversized body, so that its 413 arrives
MAX_TAGGED_GOLDENS = 50  # distinct golden ids in the metrics' tags; the rest are tagged "other"
DISTANCE_STEPS = [0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0]  # x the threshold at start

api = FastAPI(title="oi-ray inspection", summary="PASS / NO_PASS for test-golden image pairs")
# Serve pickles the deployment class when it is decorated: every helper it uses is defined above it.


@dataclass(frozen=True)
class ServiceSettings:
    """What a replica needs besides the model (from the spec's ``serve`` section)."""

    max_pairs_per_request: int
    max_request_bytes: int
    max_batch_size: int
    batch_wait_timeout_s: float
    resize_images: bool
    use_gpu: bool
    threads: int
    auth_token_env: str | None
    golden_store: str | None = None
    golden_cache_bytes: int = 0


@dataclass(frozen=True)
class _Pictures:
    """Tiled pictures of some pairs, the unit a batch is made of."""

    test: np.ndarray
    golden: np.ndarray


@dataclass(frozen=True)
class _KeptPairs:
    """Test pictures of some pairs and the registered goldens they name, the unit of a batch
    scored against kept golden features."""

    test: np.ndarray
    kept: tuple[KeptGolden, ...]


class _Metrics:
    """The replica's Prometheus metrics (Ray exports them with Serve's application tags)."""

    def __init__(self, threshold: float) -> None:
        self.pairs = Counter("oi_ray_pairs_scored", description="pairs scored")
        self.no_pass = Counter("oi_ray_no_pass_decisions", description="pairs decided NO_PASS")
        self.request_errors = Counter("oi_ray_request_errors", description="refused requests by error code",
                                      tag_keys=("code",))
        self.batch_pairs = Histogram("oi_ray_batch_pairs", description="pairs per model call",
                                     boundaries=BATCH_BOUNDARIES)
        self.bounds = [round(threshold * step, 6) for step in DISTANCE_STEPS]
        self.distance = Histogram("oi_ray_pair_distance", description="pair distances (the decision score)",
                                  boundaries=self.bounds)
        self.golden_no_pass = Counter("oi_ray_golden_no_pass_decisions", tag_keys=("golden_id",),
                                      description="pairs decided NO_PASS, by the golden they named")
        self.golden_distance = Histogram("oi_ray_golden_pair_distance", boundaries=self.bounds,
                                         tag_keys=("golden_id",),
                                         description="distances of the pairs that named a registered golden")
        self.tagged: set[str] = set()

    def record(self, distances: np.ndarray, verdicts: np.ndarray) -> None:
        self.pairs.inc(len(distances))
        flagged = int(np.count_nonzero(verdicts == NO_PASS))
        if flagged:
            self.no_pass.inc(flagged)
        for distance in distances:
            self.distance.observe(float(distance))

    def record_golden(self, golden_id: str, distances: np.ndarray, verdicts: np.ndarray) -> None:
        """The per-golden metrics, tagged by id for the first MAX_TAGGED_GOLDENS ids seen."""
        if golden_id not in self.tagged and len(self.tagged) < MAX_TAGGED_GOLDENS:
            self.tagged.add(golden_id)
        tags = {"golden_id": golden_id if golden_id in self.tagged else "other"}
        flagged = int(np.count_nonzero(verdicts == NO_PASS))
        if flagged:
            self.golden_no_pass.inc(flagged, tags=tags)
        for distance in distances:
            self.golden_distance.observe(float(distance), tags=tags)


def _token(variable: str | None) -> str | None:
    if variable is None:
        return None
    token = os.environ.get(variable, "").strip()
    if not token:
        raise RuntimeError(f"serve.auth_token_env names ${variable}, which is not set (or empty) in this "
                           f"replica's environment; set it where Ray runs the replicas")
    return token


async def _bounded_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it is known to exceed ``limit`` bytes.

    The rest of an oversized body is read and dropped before the refusal (up to
    ``DRAIN_LIMIT_BYTES``): a server that answers while the client is still sending closes a
    connection with unread data, the client sees a reset instead of the 413."""
    too_large = RequestError(413, "body_too_large", f"the request body exceeds {limit} bytes "
                             "(serve.max_request_mb)")
    declared = request.headers.get("content-length", "")
    chunks, size = [], 0
    if declared.isdigit() and int(declared) > limit:
        size = limit + 1
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + DRAIN_LIMIT_BYTES:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _form_fields(request: Request, body: bytes) -> list[tuple[str, bytes | str]]:
    """A multipart body's fields: files as bytes, text fields as str."""
    try:
        form = await MultiPartParser(request.headers, _once(body), max_part_size=len(body) + 1).parse()
    except MultiPartException as error:
        raise RequestError(400, "malformed_multipart", f"cannot parse the multipart body: {error}") from None
    fields = [(name, await value.read() if isinstance(value, UploadFile) else value)
              for name, value in form.multi_items()]
    await form.close()
    return fields


def _checked_id(golden_id: str) -> str:
    try:
        return check_golden_id(golden_id)
    except GoldenIdError as error:
        raise RequestError(422, "bad_golden_id", str(error)) from None


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class InspectionService:
    """One predictor, the HTTP API, batching and metrics (one instance per replica)."""

    def __init__(self, model: ModelFile, settings: ServiceSettings) -> None:
        torch.set_num_threads(settings.threads)
        self.model = model
        self.settings = settings
        self.layout = UploadLayout(model.card.lights, settings.max_pairs_per_request)
        self.geometry = model.card.geometry()
        self.token = _token(settings.auth_token_env)
        self.predictor = model.load(settings.use_gpu, settings.threads)
        self.model_lock = asyncio.Lock()  # health checks and batches take turns on the model
        self.model_idle = asyncio.Event()  # cleared while a batch runs: arrivals wait, then go together
        self.model_idle.set()
        self.threshold = self._threshold(None)
        for batched in (self._score, self._score_against_kept):
            batched.set_max_batch_size(settings.max_batch_size)
            batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.metrics = _Metrics(self.threshold.value)
        self.golden_stats: GoldenStats | None = None
        self.library = self._library(settings)
        log.info("serving %s (%s) at threshold %.4g", model.name, model.backend, self.threshold.value)

    def _library(self, settings: ServiceSettings) -> GoldenLibrary | None:
        if settings.golden_store is None:
            return None
        halves = self.predictor if self.model.backend == "torch" else self.model.load_halves(
            settings.use_gpu, settings.threads)
        store = GoldenStore(settings.golden_store)
        library = GoldenLibrary(store, halves, self.model.sha256, self.geometry,
                                self.layout.lights, cache_bytes=settings.golden_cache_bytes,
                                allow_resize=settings.resize_images)
        self.golden_stats = GoldenStats(store, serve.get_replica_context().replica_id.unique_id,
                                        self.metrics.bounds)
        ready = library.warm()
        log.info("golden library %s: %d goldens ready for %s (%d embedded from their kept images)",
                 settings.golden_store, ready, self.model.name, library.embedded)
        return library

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new ``user_config`` (the threshold) without restarting the replica."""
        unknown = sorted(set(user_config) - {THRESHOLD_KEY})
        if unknown:
            raise ValueError(f"user_config keys {unknown} are unknown; expected only '{THRESHOLD_KEY}'")
        value = user_config.get(THRESHOLD_KEY)
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (numeric and value > 0):
            raise ValueError(f"user_config {THRESHOLD_KEY}={value!r}: expected a number > 0, or null")
        self.threshold = self._threshold(value)
        log.info("decision threshold %.4g (%s)", self.threshold.value, self.threshold.source)

    def _threshold(self, override: float | None) -> DecisionThreshold:
        return choose_threshold(override, THRESHOLD_OVERRIDE, self.model.carried, self.model.card.margin)

    async def check_health(self) -> None:
        """Serve's health probe: the model must still score a pair to a finite distance."""
        height, width = self.model.card.input_shape[1:]
        blank = np.zeros((1, height, width, 3), np.uint8)
        async with self.model_lock:
            distance = await asyncio.to_thread(self.predictor.distances, blank, blank)
        if not np.isfinite(distance).all():
            raise RuntimeError(f"{self.model.name} scored a blank pair as {distance[0]}")

    @api.post("/v1/inspect")
    async def inspect(self, request: Request) -> JSONResponse:
        """Score the pairs of one request."""
        try:
            self._authorize(request)
            pairs = await self._read_pairs(request)
            test, golden = await asyncio.to_thread(decode_pairs, pairs, self.geometry, self.layout.lights,
                                                   allow_resize=self.settings.resize_images)
            kept = await asyncio.to_thread(self._kept_goldens, pairs)
        except RequestError as error:
            return self._refuse(error)
        uploaded = [index for index, pair in enumerate(pairs) if pair.golden_id is None]
        named = [index for index, pair in enumerate(pairs) if pair.golden_id is not None]
        distances, shots = np.zeros(len(pairs), np.float32), {}
        try:
            if uploaded:
                distances[uploaded] = await self._score_uploaded(test[uploaded], golden)
            if named:
                nearest, shot = await self._score_named(test[named], [kept[pairs[index].golden_id]
                                                                      for index in named])
                distances[named] = nearest
                shots = dict(zip(named, shot.tolist(), strict=True))
        except Exception:  # a model failure: say so in JSON, count it, keep serving
            log.exception("scoring %d pairs failed", len(pairs))
            return self._refuse(RequestError(500, "internal_error", "the model failed to score the pairs; "
                                             "see the replica's log"))
        threshold = self.threshold.value
        verdicts = decisions(distances, threshold)
        self.metrics.record(distances, verdicts)
        if named:
            await self._tally_goldens([pairs[index].golden_id for index in named], distances[named],
                                      verdicts[named])
        name = self.model.name
        results = []
        for index, (pair, distance, verdict) in enumerate(zip(pairs, distances, verdicts, strict=True)):
            result = {"id": pair.id, "distance": float(distance), "decision": str(verdict),
                      "threshold": threshold, "model": name}
            if pair.golden_id is not None:
                result.update(golden_id=pair.golden_id, golden_shot=shots[index])
            results.append(result)
        return JSONResponse({"model": name, "results": results})

    async def _score_uploaded(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        """Pairs that uploaded their goldens, in ``@serve.batch`` batches with other requests' pairs."""
        step = self.settings.max_batch_size
        return np.concatenate(await self._join_batches(self._score, [
            _Pictures(test[start:start + step], golden[start:start + step])
            for start in range(0, len(test), step)]))

    async def _join_batches(self, batched: Any, chunks: list) -> list:
        """Each chunk through the ``@serve.batch`` method ``batched``, once the model is idle (so
        that the pairs arriving during a model call form one batch, not many)."""
        await self.model_idle.wait()
        return await asyncio.gather(*(batched(chunk) for chunk in chunks))

    async def _on_the_model(self, run: Any, *args: Any) -> Any:
        """``run(*args)`` in a worker thread, with the model to itself; arrivals wait meanwhile."""
        self.model_idle.clear()
        try:
            async with self.model_lock:
                return await asyncio.to_thread(run, *args)
        finally:
            self.model_idle.set()

    async def _tally_goldens(self, golden_ids: list[str], distances: np.ndarray,
                             verdicts: np.ndarray) -> None:
        """Per-golden metrics and statistics; the statistics reach the store every few seconds."""
        ids = np.array(golden_ids)
        for golden_id in sorted(set(golden_ids)):
            mine = ids == golden_id
            self.metrics.record_golden(golden_id, distances[mine], verdicts[mine])
            self.golden_stats.record(golden_id, distances[mine], verdicts[mine])
        if self.golden_stats.due():
            try:
                await asyncio.to_thread(self.golden_stats.flush)
            except OSError:  # the store is unreachable for now: the tallies stay and go with the next flush
                log.exception("writing golden statistics to %s failed", self.settings.golden_store)

    async def _score_named(self, test: np.ndarray, kept: list[KeptGolden]) -> tuple[np.ndarray, np.ndarray]:
        """Pairs that named registered goldens, in ``@serve.batch`` batches with other requests'."""
        step = self.settings.max_batch_size
        parts = await self._join_batches(self._score_against_kept, [
            _KeptPairs(test[start:start + step], tuple(kept[start:start + step]))
            for start in range(0, len(test), step)])
        return np.concatenate([nearest for nearest, _ in parts]), np.concatenate([shot for _, shot in parts])

    def _kept_goldens(self, pairs: list[PairUpload]) -> dict[str, KeptGolden]:
        named = sorted({pair.golden_id for pair in pairs if pair.golden_id is not None})
        return {golden_id: self._require_library().kept(golden_id) for golden_id in named}

    def _score_kept(self, test: np.ndarray, kept: list[KeptGolden]) -> tuple[np.ndarray, np.ndarray]:
        """Each test against every shot of its golden, one compare call: the smallest distance
        and which shot gave it."""
        halves = self.library.halves
        features = halves.embed(test)
        rows = len(features) // len(test)
        test_rows = np.concatenate([np.tile(features[index * rows:(index + 1) * rows],
                                            (one.golden.shots, *[1] * (features.ndim - 1)))
                                    for index, one in enumerate(kept)])
        golden_rows = np.concatenate([one.features for one in kept])
        per_shot = halves.compare(test_rows, golden_rows)
        bounds = np.cumsum([0, *(one.golden.shots for one in kept)])
        shot = np.array([int(np.argmin(per_shot[start:end])) for start, end in zip(bounds[:-1], bounds[1:],
                                                                                  strict=True)])
        return per_shot[bounds[:-1] + shot], shot

    @api.put("/v1/goldens/{golden_id}")
    async def register_golden(self, golden_id: str, request: Request) -> JSONResponse:
        """Register (or replace) a golden: one shot, or several (a golden set)."""
        try:
            self._authorize(request)
            library = self._require_library()
            _checked_id(golden_id)
            shots = await self._read_golden(request)
            golden = await asyncio.to_thread(library.register, golden_id, shots)
        except RequestError as error:
            return self._refuse(error)
        return JSONResponse({**golden.describe(), "model": self.model.name}, status_code=201)

    @api.get("/v1/goldens")
    async def list_goldens(self, request: Request, after: str | None = None,
                           limit: int = 100) -> JSONResponse:
        """The registered ids, a page at a time (``after``: the last id of the previous page)."""
        try:
            self._authorize(request)
            library = self._require_library()
            if not 1 <= limit <= 1000:
                raise RequestError(422, "bad_limit", f"limit={limit}: expected 1 to 1000")
            page = await asyncio.to_thread(library.store.ids, after, limit)
        except RequestError as error:
            return self._refuse(error)
        return JSONResponse({"goldens": page, "next": page[-1] if len(page) == limit else None})

    @api.get("/v1/goldens/{golden_id}")
    async def describe_golden(self, golden_id: str, request: Request) -> JSONResponse:
        """What is registered as ``golden_id``."""
        try:
            self._authorize(request)
            library = self._require_library()
            golden = await asyncio.to_thread(library.registered, _checked_id(golden_id))
        except RequestError as error:
            return self._refuse(error)
        return JSONResponse({**golden.describe(), "model": self.model.name})

    @api.get("/v1/goldens/{golden_id}/stats")
    async def golden_statistics(self, golden_id: str, request: Request) -> JSONResponse:
        """What every replica scored against ``golden_id``: pairs, NO_PASS, distances now and overall."""
        try:
            self._authorize(request)
            library = self._require_library()
            await asyncio.to_thread(library.registered, _checked_id(golden_id))  # a 404 for an unknown id
            answer = await asyncio.to_thread(self.golden_stats.answer, golden_id)
        except RequestError as error:
            return self._refuse(error)
        return JSONResponse(answer)

    @api.delete("/v1/goldens/{golden_id}")
    async def delete_golden(self, golden_id: str, request: Request) -> JSONResponse:
        """Unregister ``golden_id``."""
        try:
            self._authorize(request)
            library = self._require_library()
            await asyncio.to_thread(library.delete, _checked_id(golden_id))
            self.golden_stats.forget(golden_id)
        except RequestError as error:
            return self._refuse(error)
        return JSONResponse({"deleted": golden_id})

    @api.get("/v1/model")
    async def describe(self, request: Request) -> JSONResponse:
        """The model card and the decision threshold in force."""
        try:
            self._authorize(request)
        except RequestError as error:
            return self._refuse(error)
        return JSONResponse({
            "model": self.model.name, "file": str(self.model.path), "backend": self.model.backend,
            "threshold": asdict(self.threshold), "card": asdict(self.model.card),
            "fields": self.layout.expected_fields(),
            "max_pairs_per_request": self.settings.max_pairs_per_request,
        })

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 with this replica's id while its model scores, else 503."""
        replica = serve.get_replica_context().replica_id.unique_id
        try:
            await asyncio.wait_for(self.check_health(), timeout=10)
        except Exception as error:  # any failure of the model means: not healthy
            return JSONResponse({"status": "unhealthy", "replica": replica, "error": str(error)},
                                status_code=503)
        return JSONResponse({"status": "ok", "replica": replica, "model": self.model.name})

    @serve.batch(batch_size_fn=lambda chunks: sum(len(chunk.test) for chunk in chunks))
    async def _score(self, chunks: list[_Pictures]) -> list[np.ndarray]:
        """One model call for the pairs of several requests; each gets its own distances back."""
        test = np.concatenate([chunk.test for chunk in chunks])
        golden = np.concatenate([chunk.golden for chunk in chunks])
        distances = await self._on_the_model(self.predictor.distances, test, golden)
        self.metrics.batch_pairs.observe(len(test))
        return np.split(distances, np.cumsum([len(chunk.test) for chunk in chunks])[:-1])

    @serve.batch(batch_size_fn=lambda chunks: sum(len(chunk.test) for chunk in chunks))
    async def _score_against_kept(self, chunks: list[_KeptPairs]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One embed and one compare call for the named-golden pairs of several requests; each
        gets its own distances and nearest shots back."""
        test = np.concatenate([chunk.test for chunk in chunks])
        kept = [one for chunk in chunks for one in chunk.kept]
        nearest, shot = await self._on_the_model(self._score_kept, test, kept)
        self.metrics.batch_pairs.observe(len(test))
        bounds = np.cumsum([len(chunk.test) for chunk in chunks])[:-1]
        return list(zip(np.split(nearest, bounds), np.split(shot, bounds), strict=True))

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        matches = hmac.compare_digest(presented.strip().encode(), self.token.encode())
        if scheme.lower() != "bearer" or not matches:
            raise RequestError(401, "unauthorized", "this service needs 'Authorization: Bearer <token>' "
                               f"with the token in ${self.settings.auth_token_env}")

    async def _read_pairs(self, request: Request) -> list[PairUpload]:
        media_type, body = await self._read_body(request)
        if media_type == "application/json":
            return await asyncio.to_thread(pairs_from_json, body, self.layout)
        return pairs_from_form(await _form_fields(request, body), self.layout)

    async def _read_golden(self, request: Request) -> list[tuple[bytes, ...]]:
        media_type, body = await self._read_body(request)
        if media_type == "application/json":
            return await asyncio.to_thread(golden_from_json, body, self.layout)
        return golden_from_form(await _form_fields(request, body), self.layout)

    async def _read_body(self, request: Request) -> tuple[str, bytes]:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in ("application/json", "multipart/form-data"):
            raise RequestError(415, "unsupported_media_type", f"content type {media_type or 'none'!r}; send "
                               "multipart/form-data (test.<Light>, golden.<Light> files) or application/json")
        return media_type, await _bounded_body(request, self.settings.max_request_bytes)

    def _require_library(self) -> GoldenLibrary:
        if self.library is None:
            raise RequestError(404, "no_golden_library", "this service keeps no goldens: upload each pair's "
                               "golden images, or set serve.golden_store (a folder or a bucket URI) and "
                               "deploy again")
        return self.library

    def _refuse(self, error: RequestError) -> JSONResponse:
        self.metrics.request_errors.inc(tags={"code": error.code})
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)
