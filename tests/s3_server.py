"""A real S3-compatible server on 127.0.0.1 for the tests (moto's standalone server), reached
the way users reach MinIO or Ceph: through ``AWS_ENDPOINT_URL`` and the usual credential
variables, so oi-ray's own code path is the production one."""

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

S3_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@contextmanager
def s3_server(*buckets: str) -> Iterator[str]:
    """Start the server on a free loopback port with ``buckets`` in it, point this process's
    environment (and so the Ray processes started after it) at it; yield its endpoint URL.
    Stops the server and restores the environment afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
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
        server.stop()


def upload_folder(folder: Path, uri: str) -> None:
    """Copy every file under the local ``folder`` to the ``s3://`` prefix ``uri``."""
    target, prefix = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(folder), prefix, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=target)
