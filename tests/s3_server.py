"""A real S3 endpoint for tests: moto's server on 127.0.0.1, reached through s3fs like any bucket.

``s3_server`` (one per test session) starts ``ThreadedMotoServer`` on a free port of 127.0.0.1
and points every AWS client of this process at it through the environment, as a user's job
would be (``AWS_ENDPOINT_URL``, dummy credentials, no instance metadata lookup, no proxy), so
nothing talks to any other address. ``s3_bucket`` gives each test a bucket of its own, as an
``s3://`` URL. ``child_env`` is the same environment for a child process.

Import the fixtures into a test module with ``from s3_server import s3_bucket, s3_server``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# Dummy credentials and a local endpoint: what boto, s3fs and aiobotocore read.
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "NO_PROXY": "127.0.0.1",
}
_UNSET = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    """``http://127.0.0.1:<port>``."""

    def env(self) -> dict[str, str]:
        """The variables that point a process's AWS clients at this server."""
        return {**_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):  # type: ignore[no-untyped-def]  # a boto3 client, untyped
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = S3Server(f"http://127.0.0.1:{port}")
    saved = {name: os.environ.get(name) for name in (*server.env(), *_UNSET)}
    os.environ.update(server.env())
    for name in _UNSET:
        os.environ.pop(name, None)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        yield server
    finally:
        moto.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A new, empty bucket: ``s3://<name>``."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    try:
        yield f"s3://{name}"
    finally:
        # Listings are cached per file system instance; the next test starts afresh.
        with contextlib.suppress(Exception):
            s3fs.S3FileSystem.clear_instance_cache()
