"""A local S3-compatible server for tests: moto's server mode (`python -m moto.server`) in a process
of the test's own, on a free port of 127.0.0.1, stopped by its pid. Needs `moto[server]` >= 5.2.2
(5.2.0-5.2.1 answer CompleteMultipartUpload with a root tag pyarrow rejects, getmoto/moto#10055);
tests skip with the reason when it is missing or has that bug."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    port: int
    pid: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def query(self) -> str:
        """The URI form of the endpoint: `s3://BUCKET/PATH` + this."""
        return f"?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def env(self, endpoint: bool = True) -> dict[str, str]:
        """Credentials, and with `endpoint` the endpoint as pyarrow reads it from the environment."""
        return {**CREDENTIALS, **({"AWS_ENDPOINT_URL_S3": self.endpoint} if endpoint else {})}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.client().exceptions.NoSuchKey:
            return None

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)


def _probe_multipart(server: S3Server) -> None:
    """Skip when this moto cannot complete the multipart uploads pyarrow makes for every file."""
    import pyarrow.fs as pafs

    server.create_bucket("probe")
    fs, path = pafs.FileSystem.from_uri("s3://probe/x" + server.query)
    try:
        with fs.open_output_stream(path) as handle:
            handle.write(b"probe")
    except OSError as exc:
        import moto

        pytest.skip(f"moto {moto.__version__} cannot complete pyarrow's multipart uploads ({str(exc)[:80]}...; "
                    "getmoto/moto#10055): pip install 'moto[server]>=5.2.2'")


@contextmanager
def moto_s3(log: Path, timeout: float = 60.0) -> Iterator[S3Server]:
    """A moto S3 server of this test's own; stopped (by its pid) on exit."""
    pytest.importorskip("moto.server", reason="needs moto's server mode: pip install 'moto[server]>=5.2.2'")
    pytest.importorskip("boto3")
    port = free_port()
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **CREDENTIALS})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server did not listen on {port} within {timeout:.0f} s")
                time.sleep(0.2)
        server = S3Server(port=port, pid=proc.pid)
        _probe_multipart(server)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
