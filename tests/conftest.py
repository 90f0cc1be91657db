"""Shared pytest fixtures. Storage: a real S3 protocol server (moto, server mode) on loopback + local storage."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from checkpoints import Storage, StorageConfig

# ----------------------------------------------------------------------------------------------------- storage

# Fake credentials for the moto server. Set for the whole session, before any ray.init, so Ray workers inherit them;
# the config-file variables point nowhere so a developer's real ~/.aws profile can never be used by a test.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the loopback S3 server."""

    name: str
    endpoint_url: str  # http://127.0.0.1:PORT

    @property
    def uri(self) -> str:
        return f"s3://{self.name}"

    def config(self, prefix: str = "", **overrides: object) -> StorageConfig:
        """StorageConfig for `s3://bucket/prefix` on this endpoint; fast retries unless overridden."""
        kwargs: dict[str, object] = {"retries": 3, "backoff_s": 0.01, "endpoint_url": self.endpoint_url}
        kwargs.update(overrides)
        return StorageConfig(uri=f"{self.uri}/{prefix}".rstrip("/"), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server (threaded, in this process, real HTTP on a free loopback port)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        for key, value in FAKE_AWS_ENV.items():
            mp.setenv(key, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> S3Bucket:
    """A new, empty bucket per test."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return S3Bucket(name=name, endpoint_url=s3_server)


@pytest.fixture
def s3_storage(s3_bucket: S3Bucket) -> Storage:
    """Storage rooted at `s3://<fresh bucket>/runs` with fast retries."""
    return Storage(s3_bucket.config("runs"))


@pytest.fixture
def local_storage(tmp_path: Path) -> Storage:
    """Storage rooted at a fresh local directory."""
    return Storage(StorageConfig(uri=str(tmp_path / "storage"), retries=3, backoff_s=0.01))


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    """The same test on a local folder and on S3."""
    return request.getfixturevalue(f"{request.param}_storage")


# --------------------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="session")
def ray_cluster(s3_server: str, tmp_path_factory: pytest.TempPathFactory):
    """The one local Ray cluster of the session: pipeline, Tune and Serve tests all use it (`ray_cluster` argument).

    Started after the fake AWS credentials are in the environment, so workers and replicas inherit them. 4 logical
    CPUs on 2 cores: two 1-CPU Train workers next to any other actor would otherwise wait on each other forever;
    Serve replicas and Tune trials ask for fractional CPUs. Session scope because ray.init costs ~7 s, and Serve
    tests shut down their own applications (serve.shutdown) rather than the cluster.
    """
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("WANDB_MODE", "disabled")  # one test turns offline wandb on explicitly
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        if ray.is_initialized():
            yield ray
            return
        # Worker logs reach the driver so that pytest shows a failing worker's traceback; Ray's own driver-side
        # messages only from WARNING up.
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
        try:
            yield ray
        finally:
            ray.shutdown()
