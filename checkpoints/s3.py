"""The S3 backend (AWS, MinIO, moto): file primitives over boto3, whose structured errors (HTTP status, error code,
connection vs. timeout) decide what is transient; the pyarrow filesystem Ray Train writes through.

MinIO and other S3 clones: boto3 >= 1.36 (and recent AWS C++ SDKs inside pyarrow) send CRC checksums by default,
which older servers reject. Set ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` and
``AWS_RESPONSE_CHECKSUM_VALIDATION=when_required`` in the environment (of the driver and of every Ray worker, e.g.
via runtime_env env_vars); both clients read them. Credentials always come from the standard AWS chain
(env vars, profile, instance role) and are never put in URIs, messages or logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import boto3.exceptions
import botocore.exceptions as bce
import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from s3transfer.exceptions import RetriesExceededError

from .errors import StorageUnreachable
from .retry import TRANSIENT_TYPES, one_line, walk_causes
from .uri import StorageConfig

# Error codes S3 (and clones) use for "try again later"; anything 5xx is retried as well.
_TRANSIENT_CODES = {
    "RequestTimeout",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeTooSkewed",
}
_TRANSIENT_TYPES = (
    bce.ConnectionError,
    bce.HTTPClientError,
    bce.IncompleteReadError,
    bce.ChecksumError,
    bce.FlexibleChecksumError,
    RetriesExceededError,
    *TRANSIENT_TYPES,
)


def _status(exc: bce.ClientError) -> int:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 5xx/throttling answers, dropped or refused connections, timeouts.
    Follows the cause chain because s3transfer wraps the botocore error (S3UploadFailedError from ClientError)."""
    for e in walk_causes(exc):
        if isinstance(e, bce.ClientError):
            status, code = _status(e), e.response.get("Error", {}).get("Code", "")
            if status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES:
                return True
        elif isinstance(e, _TRANSIENT_TYPES):
            return True
    return False


def s3_client(cfg: StorageConfig, *, connect_timeout_s: float | None = None, read_timeout_s: float | None = None):
    """A boto3 S3 client with exactly one attempt per call: the retry policy is the only retry layer, so the
    retry count in the config is the real one. `cfg` must be resolved (StorageConfig.resolved())."""
    boto_cfg = BotoConfig(
        region_name=cfg.region,
        connect_timeout=connect_timeout_s or cfg.connect_timeout_s,
        read_timeout=read_timeout_s or cfg.read_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path" if cfg.path_style else "virtual"},
    )
    # A fresh session per client: boto3's default session is not thread-safe to create clients from.
    return boto3.session.Session().client("s3", endpoint_url=cfg.endpoint_url, config=boto_cfg)


class S3Backend:
    """File primitives on `bucket/key` paths; no retries here."""

    errors: tuple[type[BaseException], ...] = (
        bce.BotoCoreError,
        bce.ClientError,
        boto3.exceptions.Boto3Error,
        OSError,
        RetriesExceededError,
    )
    transient = staticmethod(is_transient)

    def __init__(self, cfg: StorageConfig):
        self.config = cfg
        self.client = s3_client(cfg)
        # One attempt inside s3transfer too (see s3_client); multipart above 64 MiB for large weight files.
        self.transfer = TransferConfig(multipart_threshold=64 << 20, num_download_attempts=1)

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def exists(self, path: str) -> bool:
        bucket, key = self._split(path)
        if key:
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except bce.ClientError as exc:
                if _status(exc) != 404:
                    raise
        # Not an object: a "directory" exists when something lives under it.
        resp = self.client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
        return resp.get("KeyCount", 0) > 0

    def get_bytes(self, path: str) -> bytes:
        bucket, key = self._split(path)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except bce.ClientError as exc:
            if _status(exc) == 404:
                raise FileNotFoundError(f"s3://{path} does not exist") from None
            raise

    def put_bytes(self, path: str, data: bytes) -> None:
        bucket, key = self._split(path)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def put_file(self, src: Path, path: str) -> None:
        bucket, key = self._split(path)
        self.client.upload_file(str(src), bucket, key, Config=self.transfer)

    def get_file(self, path: str, dst: Path) -> None:
        bucket, key = self._split(path)
        try:
            # s3transfer writes to a temp name and renames, so a failed download leaves no partial file.
            self.client.download_file(bucket, key, str(dst), Config=self.transfer)
        except bce.ClientError as exc:
            if _status(exc) == 404:
                raise FileNotFoundError(f"s3://{path} does not exist") from None
            raise

    def delete(self, path: str) -> None:
        bucket, key = self._split(path)
        self.client.delete_object(Bucket=bucket, Key=key)  # S3 deletes of missing keys succeed

    def delete_tree(self, path: str) -> None:
        # One DeleteObjects call per listing page (both cap at 1000 keys); directory markers go too.
        bucket, _ = self._split(path)
        for _, page in self._list(path, None):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if not keys:
                continue
            errors = self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True}).get("Errors")
            if errors:
                raise OSError(f"could not delete {len(errors)} objects under s3://{path}, e.g. {errors[0]}")

    def _list(self, path: str, delimiter: str | None):
        bucket, key = self._split(path)
        prefix = f"{key}/" if key else ""
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
            yield prefix, page

    def list_files(self, path: str) -> list[str]:
        # Keys ending in "/" are directory markers made by pyarrow/Ray, not files.
        return [
            obj["Key"][len(prefix) :]
            for prefix, page in self._list(path, None)
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        ]

    def list_dirs(self, path: str) -> list[str]:
        return [
            cp["Prefix"][len(prefix) :].rstrip("/")
            for prefix, page in self._list(path, "/")
            for cp in page.get("CommonPrefixes", [])
        ]

    def filesystem(self) -> pafs.FileSystem:
        cfg = self.config
        kwargs: dict[str, Any] = {}
        if cfg.endpoint_url is not None:
            ep = urlsplit(cfg.endpoint_url)
            # pyarrow wants host:port and the scheme separately; it ignores AWS_ENDPOINT_URL on its own.
            kwargs.update(endpoint_override=ep.netloc + ep.path, scheme=ep.scheme)
        return pafs.S3FileSystem(
            region=cfg.region,
            connect_timeout=cfg.connect_timeout_s,
            force_virtual_addressing=not cfg.path_style,
            # Ray's checkpoint upload has no retries of its own (ray issue 55350): let the AWS SDK retry.
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.retries + 1),
            **kwargs,
        )

    def check_reachable(self, root: str, timeout_s: float) -> None:
        """HEAD the bucket once with short timeouts; StorageUnreachable says what is wrong, in one line."""
        cfg = self.config
        bucket = root.split("/", 1)[0]
        endpoint = cfg.endpoint_url or f"AWS S3 ({cfg.region})"
        where = f"bucket {bucket!r} at {endpoint}"
        client = s3_client(cfg, connect_timeout_s=timeout_s, read_timeout_s=timeout_s)
        try:
            client.head_bucket(Bucket=bucket)
        except (bce.NoCredentialsError, bce.PartialCredentialsError) as exc:
            raise StorageUnreachable(
                f"no usable AWS credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            ) from exc
        except bce.ClientError as exc:
            status, code = _status(exc), exc.response.get("Error", {}).get("Code", "")
            if status == 404 or code == "NoSuchBucket":
                msg = f"{where} does not exist"
            elif status == 403:
                msg = f"access denied to {where} (HTTP 403): check the AWS credentials and bucket policy"
            elif status in (301, 307, 400) and cfg.endpoint_url is None:
                msg = f"{where} answered HTTP {status}: is the bucket in region {cfg.region!r}?"
            else:
                msg = f"{where} answered HTTP {status} {code}".rstrip()
            raise StorageUnreachable(msg) from exc
        except bce.BotoCoreError as exc:
            raise StorageUnreachable(
                f"S3 endpoint {endpoint} unreachable for bucket {bucket!r} (timeout {timeout_s:g}s): {one_line(exc)}"
            ) from exc
