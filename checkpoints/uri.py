"""Storage URIs and their config: `s3://bucket/prefix[?endpoint_override=host:port&scheme=http&region=...]` or a
local directory (`/abs/path`, `./relative`, `file:///abs/path`).

Building a StorageConfig is pure: it checks and normalises what was given and reads no environment variable, so a
config can be printed, hashed or written to YAML anywhere. `resolved()` fills the endpoint, region and addressing
from the AWS variables of the process that is about to use the storage (Storage calls it).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_QUERY_PARAMS = ("endpoint_override", "scheme", "region")


@dataclass
class StorageConfig:
    """Where a run's checkpoints and manifests live."""

    uri: str  # s3://bucket/prefix[?endpoint_override=host:port&scheme=http&region=...] or a local directory
    endpoint_url: str | None = None  # http(s)://host:port; None -> AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL
    region: str | None = None  # None -> AWS_REGION, then AWS_DEFAULT_REGION, then us-east-1
    path_style: bool | None = None  # None -> True when an endpoint is set (MinIO/moto), else virtual-host addressing
    retries: int = 4  # extra attempts per file/request on transient errors (5xx, resets, timeouts)
    backoff_s: float = 0.5  # first retry delay; doubles per attempt (capped at 30 s, jittered)
    connect_timeout_s: float = 5.0  # short, so a dead endpoint fails in seconds instead of hanging
    read_timeout_s: float = 60.0  # per socket read; large parts of a big checkpoint need time

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise ValueError(
                f"StorageConfig.uri must be a non-empty string (s3://bucket/prefix or a path), got {self.uri!r}"
            )
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"StorageConfig.retries must be an int >= 0, got {self.retries!r}")
        if self.backoff_s < 0:
            raise ValueError(f"StorageConfig.backoff_s must be >= 0, got {self.backoff_s!r}")
        for name in ("connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"StorageConfig.{name} must be > 0, got {getattr(self, name)!r}")

        uri = self.uri.strip()
        if "://" not in uri or uri.startswith("file://"):
            if self.endpoint_url is not None:
                raise ValueError(f"StorageConfig.endpoint_url is only valid with an s3:// uri, got uri={uri!r}")
            path = urlsplit(uri).path if uri.startswith("file://") else uri
            # Ray workers run with another cwd: a local root must be absolute.
            self.uri = os.path.abspath(os.path.expanduser(path))
        else:
            self._normalise_s3(uri)
        if self.endpoint_url is not None:
            self.endpoint_url = _check_endpoint(self.endpoint_url, "StorageConfig.endpoint_url")

    def _normalise_s3(self, uri: str) -> None:
        """Validate an s3:// uri and move its query parameters into the fields."""
        parts = urlsplit(uri)
        if parts.scheme != "s3":
            raise ValueError(
                f"StorageConfig.uri: scheme {parts.scheme!r} is not supported (use s3:// or a local path), got {uri!r}"
            )
        if "@" in parts.netloc:
            raise ValueError(
                "StorageConfig.uri must not embed credentials; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
            )
        bucket = parts.netloc
        if not _BUCKET_RE.match(bucket):
            raise ValueError(
                f"StorageConfig.uri: {bucket!r} is not a valid bucket name (3-63 chars of a-z, 0-9, "
                f"'.', '-'), got {uri!r}"
            )
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - set(_QUERY_PARAMS)
        if unknown:
            raise ValueError(
                f"StorageConfig.uri: unsupported query parameter(s) {sorted(unknown)}; "
                f"allowed: {', '.join(_QUERY_PARAMS)}"
            )
        if "endpoint_override" in query:
            endpoint = query["endpoint_override"]
            if "://" not in endpoint:
                endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
            if self.endpoint_url is not None and self.endpoint_url.rstrip("/") != endpoint.rstrip("/"):
                raise ValueError(
                    f"StorageConfig.endpoint_url={self.endpoint_url!r} conflicts with "
                    f"endpoint_override={endpoint!r} in the uri"
                )
            self.endpoint_url = endpoint
        if "region" in query and self.region is None:
            self.region = query["region"]
        prefix = "/".join(p for p in parts.path.split("/") if p)
        self.uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    @property
    def is_s3(self) -> bool:
        """True for an s3:// uri, False for a local directory."""
        return self.uri.startswith("s3://")

    def resolved(self, environ: Mapping[str, str] | None = None) -> StorageConfig:
        """A copy with endpoint, region and addressing filled from `environ` (default: this process's environment)
        wherever the config leaves them open. Local configs have nothing to resolve."""
        if not self.is_s3:
            return self
        env = os.environ if environ is None else environ
        endpoint = self.endpoint_url
        if endpoint is None and (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")):
            name = "AWS_ENDPOINT_URL_S3" if env.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
            endpoint = _check_endpoint(env[name], name)
        region = self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        path_style = endpoint is not None if self.path_style is None else self.path_style
        return dataclasses.replace(self, endpoint_url=endpoint, region=region, path_style=path_style)


def _check_endpoint(endpoint: str, name: str) -> str:
    ep = urlsplit(endpoint)
    if ep.scheme not in ("http", "https") or not ep.netloc:
        raise ValueError(f"{name} must look like http(s)://host:port, got {endpoint!r}")
    if "@" in ep.netloc:
        raise ValueError(f"{name} must not embed credentials")
    return endpoint.rstrip("/")
