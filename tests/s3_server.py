"""A real S3-compatible server on 127.0.0.1 for the tests (moto's standalone server), reached
the way users reach MinIO or Ceph: through ``AWS_ENDPOINT_URL`` and the usual credential
variables, so oi-ray's own code path is the production one."""

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs
import requests

SERVER_START_S = 30
S3_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@contextmanager
def s3_server(*buckets: str, copy_delay_s: float = 0.0) -> Iterator[str]:
    """Start the server in this process on a free loopback port with ``buckets`` in it, point
    this process's environment (and so the Ray processes started after it) at it; yield its
    endpoint URL. Stops the server and restores the environment afterwards.

    ``copy_delay_s``: each server-side copy answers that much later, silent meanwhile (a store
    copying a large object)."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    moto = DomainDispatcherApplication(create_backend_app)

    def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if copy_delay_s and "HTTP_X_AMZ_COPY_SOURCE" in environ:
            time.sleep(copy_delay_s)
        return moto(environ, start_response)

    server = make_server("127.0.0.1", 0, application, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with _reached_at(f"http://127.0.0.1:{server.server_port}", buckets) as endpoint:
            yield endpoint
    finally:
        server.shutdown()
        thread.join()


@contextmanager
def s3_server_process(log: Path, *buckets: str, preload: Path | None = None) -> Iterator[tuple[str, int]]:
    """The same server as its own process (its own interpreter lock: for loads heavier than a
    test's), logging a line per request into ``log``; yields its endpoint URL and process id,
    and stops it by that id.

    ``preload``: a file of ``bucket/key<TAB>local file`` lines, put into the server's memory
    before it listens (a benchmark's setup at memory speed; moto takes ~80 PUTs/s over HTTP).
    Their buckets are made there; ``buckets`` names only the others."""
    from helpers import free_port  # here: the server process runs this file without oi_ray's imports

    port = free_port()
    command = [sys.executable, __file__, str(port), *([str(preload)] if preload else [])]
    with open(log, "w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                requests.get(endpoint, timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto's server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        with _reached_at(endpoint, buckets):
            yield endpoint, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextmanager
def _reached_at(endpoint: str, buckets: tuple[str, ...]) -> Iterator[str]:
    """Point this process's environment at ``endpoint`` and make ``buckets`` there."""
    import boto3

    saved = {name: os.environ.get(name) for name in S3_ENVIRONMENT}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="oi-ray-test",
                      AWS_SECRET_ACCESS_KEY="oi-ray-test", AWS_DEFAULT_REGION="us-east-1")
    try:
        client = boto3.client("s3")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def requests_served() -> Iterator[list[str]]:
    """The request lines the server answers inside the block (``GET /bucket?list-type=2&...``),
    in order, and none printed: the server logs each one through werkzeug's logger."""
    lines: list[str] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("werkzeug")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers, logger.propagate = [Recorder()], False
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.handlers, _, logger.propagate = saved
        logger.setLevel(saved[1])


def _serve(port: int, preload: Path | None) -> None:
    """Run moto's server on 127.0.0.1:``port`` (a request line each on stderr), after putting
    the objects ``preload`` lists straight into its S3 backend."""
    import moto.server
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for line in preload.read_text().splitlines() if preload else []:
        target, source = line.split("\t")
        bucket, key = target.split("/", 1)
        if bucket not in backend.buckets:
            backend.create_bucket(bucket, "us-east-1")
        backend.put_object(bucket, key, Path(source).read_bytes())
    moto.server.main(["-H", "127.0.0.1", "-p", str(port)])


def upload_folder(folder: Path, uri: str) -> None:
    """Copy every file under the local ``folder`` to the ``s3://`` prefix ``uri``."""
    target, prefix = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(folder), prefix, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=target)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
