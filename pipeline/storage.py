"""Object storage in one place: URIs, the S3 client config, and byte-level I/O for local paths and ``s3://``.

boto3 lists and probes; pyarrow's S3FileSystem moves data. Both are built from one ``StorageConfig`` (pyarrow reads
neither ``AWS_ENDPOINT_URL`` nor the bucket's region by itself), and ``storage_settings`` builds that config the same
way for every command: flags, then the config file, then the AWS environment, then defaults. Credentials are never
stored in ``StorageConfig``: they come from the standard AWS chain inside each process (so no config we write out
can carry a secret) and are re-read before they expire. Clients are created lazily per process (boto3 clients are
not fork/pickle-safe).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pyarrow.fs as pafs

__all__ = [
    "StorageConfig",
    "storage_settings",
    "storage_env_values",
    "settle",
    "bucket_region",
    "ask_bucket_region",
    "check_source_allowed",
    "CHECKSUM_MODES",
    "StorageError",
    "StorageOutage",
    "ObjectTooLarge",
    "is_transient",
    "is_s3",
    "split_s3",
    "join",
    "filesystem",
    "s3_client",
    "read_bytes",
    "write_bytes",
    "list_files",
    "exists",
    "delete",
    "delete_tree",
    "check_access",
    "redact",
]


class StorageError(RuntimeError):
    """Storage is unreachable or misconfigured; the message names the fix."""


class StorageOutage(StorageError):
    """Storage failed for most requests for longer than ``storage.outage_wait_s``: the job stops, a re-run resumes."""


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object storage. Holds no secrets: credentials come from the AWS chain in each process."""

    endpoint_url: str | None = None  # S3-compatible endpoint, e.g. "http://127.0.0.1:9000"; None = AWS
    # Signing region. None: us-east-1 for a custom endpoint; on AWS each bucket's own region (asked once per
    # bucket and process), so a bucket outside us-east-1 works without settings.
    region: str | None = None
    # Request checksums (CRC trailers with aws-chunked uploads) for boto3 and pyarrow: "when_supported" (AWS's
    # default) or "when_required". None: "when_required" for a custom endpoint, whose store may keep the chunk
    # framing inside the object (s3rver does: every Parquet file then reads "magic bytes not found").
    request_checksum_calculation: str | None = None
    retry_mode: str = "standard"  # botocore retry mode: "standard" or "adaptive"
    max_attempts: int = 8  # botocore/pyarrow attempts per request, retries on 5xx, SlowDown, resets
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0
    # Outage guard (read.fetch_batch, per worker process): when at least outage_min_failures object reads failed
    # transiently within outage_window_s and they are at least outage_rate of the reads there, the worker backs off
    # and probes; storage still down after outage_wait_s -> the job stops with the cause (a re-run resumes) instead
    # of turning the rest of the dataset into error rows.
    outage_window_s: float = 60.0
    outage_rate: float = 0.8
    outage_min_failures: int = 20
    outage_wait_s: float = 300.0

    def __post_init__(self) -> None:
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(
                f"storage.endpoint_url must start with http:// or https://, got {self.endpoint_url!r}"
            )
        if self.retry_mode not in ("standard", "adaptive", "legacy"):
            raise ValueError(
                f"storage.retry_mode must be standard, adaptive or legacy, got {self.retry_mode!r}"
            )
        if self.max_attempts < 1:
            raise ValueError(f"storage.max_attempts must be >= 1, got {self.max_attempts}")
        if self.request_checksum_calculation not in (None, *CHECKSUM_MODES):
            raise ValueError(
                f"storage.request_checksum_calculation must be one of {CHECKSUM_MODES}, got "
                f"{self.request_checksum_calculation!r}"
            )
        if not 0 < self.outage_rate <= 1:
            raise ValueError(f"storage.outage_rate must be in (0, 1], got {self.outage_rate}")
        if self.outage_min_failures < 1 or self.outage_window_s <= 0 or self.outage_wait_s < 0:
            raise ValueError(
                "storage.outage_min_failures must be >= 1, outage_window_s > 0 and outage_wait_s >= 0, got "
                f"{self.outage_min_failures}, {self.outage_window_s}, {self.outage_wait_s}"
            )

    @property
    def checksum_mode(self) -> str:
        """The request-checksum mode in force: the setting, else by endpoint (see the field)."""
        if self.request_checksum_calculation:
            return self.request_checksum_calculation
        return "when_required" if self.endpoint_url else "when_supported"

    @classmethod
    def from_env(cls, **flags) -> StorageConfig:
        """``storage_settings(flags)``: the command line's values over the AWS environment over defaults."""
        return storage_settings(flags)


CHECKSUM_MODES = ("when_supported", "when_required")
# The AWS variables boto3 honours, in their precedence order, and the StorageConfig key each one sets.
_ENV_KEYS = (
    ("endpoint_url", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
    ("region", ("AWS_REGION", "AWS_DEFAULT_REGION")),
    ("request_checksum_calculation", ("AWS_REQUEST_CHECKSUM_CALCULATION",)),
)


def storage_env_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The StorageConfig keys the AWS environment sets (AWS_ENDPOINT_URL_S3 over AWS_ENDPOINT_URL, AWS_REGION over
    AWS_DEFAULT_REGION, AWS_REQUEST_CHECKSUM_CALCULATION); empty variables count as unset."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    ignore_endpoints = environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"  # as boto3
    for key, names in _ENV_KEYS:
        if key == "endpoint_url" and ignore_endpoints:
            continue
        found = next((environ[n] for n in names if environ.get(n)), None)
        if found is not None:
            values[key] = found.lower() if key == "request_checksum_calculation" else found
    return values


def settle(cfg: StorageConfig) -> StorageConfig:
    """``cfg`` with its automatic choices made explicit, so that a run's manifest records what was used."""
    if cfg.request_checksum_calculation is None:
        return replace(cfg, request_checksum_calculation=cfg.checksum_mode)
    return cfg


def storage_settings(
    flags: Mapping | None = None, file: Mapping | None = None, environ: Mapping[str, str] | None = None
) -> StorageConfig:
    """The one way to build storage settings: ``flags`` (None values ignored), then ``file`` (the config file's
    ``storage:`` section), then the AWS environment (``storage_env_values``), then the defaults."""
    values: dict = storage_env_values(environ)
    values.update({k: v for k, v in (file or {}).items() if v is not None})
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    known = {f.name for f in fields(StorageConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown storage key(s) {unknown}; known keys: {sorted(known)}")
    return settle(StorageConfig(**values))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"expected an s3:// URI, got {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URI/path parts with '/', never escaping ``base``: parts are relative keys."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        if any(seg in ("..", ".") for seg in part.split("/")):
            raise ValueError(f"path part {part!r} may not contain '.' or '..' segments")
        out = f"{out}/{part}"
    return out


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() + "://" if "://" in uri else ""


def _under(uri: str, prefix: str) -> bool:
    if not _scheme(prefix):  # local prefixes compare as normalised absolute paths ('/data/../etc' is '/etc')
        if _scheme(uri):
            return False
        uri, prefix = os.path.normpath(os.path.abspath(uri)), os.path.normpath(os.path.abspath(prefix))
        return uri == prefix or uri.startswith(prefix.rstrip("/") + "/")
    return uri == prefix.rstrip("/") or uri.startswith(prefix.rstrip("/") + "/")


def check_source_allowed(
    source_uri: str, manifest_uri: str, allowed_prefixes: tuple[str, ...] | None = None
) -> None:
    """Raise PermissionError when a manifest may not name ``source_uri`` (the manifest trust rule).

    With ``read.allowed_prefixes`` set, every image and label a manifest names must lie under one of them. Without
    it, an ``s3://`` manifest may name only ``s3://`` objects (never a local file of the machine that reads it),
    and a local manifest local files or ``s3://`` objects; any other scheme (``file://``, ``http://``) is refused.
    The message names the source and the rule, never the source's contents.
    """
    if allowed_prefixes:
        if any(_under(source_uri, p) for p in allowed_prefixes):
            return
        raise PermissionError(
            f"manifest {manifest_uri} names {source_uri}, outside read.allowed_prefixes {list(allowed_prefixes)}"
        )
    scheme, own = _scheme(source_uri), _scheme(manifest_uri)
    if scheme == own or (own == "" and scheme == "s3://"):
        return
    allowed = "s3:// objects" if own == "s3://" else "local paths and s3:// objects"
    raise PermissionError(
        f"manifest {manifest_uri} names {source_uri}: a{'n s3://' if own else ' local'} manifest may name only "
        f"{allowed}; list other sources in read.allowed_prefixes"
    )


# S3 error codes that say nothing about the object itself: throttling, server trouble, expired credentials, clock.
# Refused credentials (AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch) are not here: a re-run meets them
# again, so a row that got one is permanent and a scheduler re-running on exit 75 does not loop.
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequestsException",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "BadGateway",
    "ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "RequestExpired", "RequestTimeTooSkewed",
}  # fmt: skip
# OSError numbers of a network or a device that may answer next time; every other errno is about the object
# (ENOENT, EACCES, ELOOP, ENAMETOOLONG, EISDIR, ...).
_TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN, errno.EINTR, errno.EIO, errno.ESTALE,
}  # fmt: skip
# What pyarrow's S3 errors (an OSError without errno) say when the cause is the network or the service.
_TRANSIENT_TEXT = (
    "http status 5", "http status 429", "slow_down", "slowdown", "throttl", "network_connection",
    "request_timeout", "requesttimeout", "timed out", "timeout", "curlcode: 28", "connection reset",
    "connection refused", "service_unavailable", "serviceunavailable", "internal_failure", "internalerror",
    "expired_token", "expiredtoken", "broken pipe",
)  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    """True only for named causes a re-run may not meet: timeouts, resets, 5xx, throttling, expired credentials.

    Everything else is about the object or the request and is permanent: missing, a folder, refused access, a
    symlink loop, a name too long, over ``read.max_bytes``, any other 4xx.
    """
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - boto3 is a dependency
        bx = None
    if bx is not None:
        if isinstance(exc, bx.ClientError):
            error = exc.response.get("Error", {})
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return str(error.get("Code")) in _TRANSIENT_CODES or status >= 500 or status == 429
        # Timeouts, resets, closed connections, a truncated body, the credential provider not answering.
        named = (
            bx.ConnectionError,
            bx.HTTPClientError,
            bx.ResponseStreamingError,
            bx.IncompleteReadError,
            bx.CredentialRetrievalError,
        )
        if isinstance(exc, named):
            return True
        if isinstance(
            exc, bx.BotoCoreError
        ):  # parameter validation, unknown endpoint, no credentials: config
            return False
    if isinstance(exc, OSError):
        if exc.errno is not None:
            return exc.errno in _TRANSIENT_ERRNOS
        text = str(exc).lower()  # pyarrow's S3 errors carry the HTTP story in the text
        return any(m in text for m in _TRANSIENT_TEXT)
    return False


def redact(text: str) -> str:
    """Remove any AWS secret visible in this process's environment from a message before it is logged or stored."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


@functools.lru_cache(maxsize=8)
def _boto_session():
    import boto3

    return boto3.session.Session()


DEFAULT_REGION = "us-east-1"


@functools.lru_cache(maxsize=8)
def s3_client(cfg: StorageConfig, region: str | None = None):
    """A boto3 S3 client for this process (cached per config). Its credentials refresh themselves (botocore)."""
    from botocore.config import Config

    return _boto_session().client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=region or cfg.region or DEFAULT_REGION,
        config=Config(
            retries={"mode": cfg.retry_mode, "max_attempts": cfg.max_attempts},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.request_timeout_s,
            s3={"addressing_style": "path"} if cfg.endpoint_url else {},
            request_checksum_calculation=cfg.checksum_mode,
        ),
    )


@functools.lru_cache(maxsize=256)
def bucket_region(bucket: str, cfg: StorageConfig) -> str:
    """The region pyarrow signs for: ``cfg.region``, else us-east-1 for a custom endpoint, else (on AWS) the
    bucket's own region, asked once per bucket and process."""
    if cfg.region or cfg.endpoint_url:
        return cfg.region or DEFAULT_REGION
    return ask_bucket_region(s3_client(cfg), bucket)


def ask_bucket_region(client, bucket: str) -> str:
    """A bucket's region from S3: HEAD bucket's x-amz-bucket-region (AWS sends it with a 403 and a 301 too), else
    GetBucketLocation, else us-east-1 (the request itself will then say what is wrong)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        headers = client.head_bucket(Bucket=bucket)["ResponseMetadata"].get("HTTPHeaders", {})
    except ClientError as e:
        headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    except BotoCoreError:
        headers = {}
    if headers.get("x-amz-bucket-region"):
        return headers["x-amz-bucket-region"]
    try:
        return client.get_bucket_location(Bucket=bucket).get("LocationConstraint") or DEFAULT_REGION
    except (ClientError, BotoCoreError):
        return DEFAULT_REGION


_fs_lock = threading.Lock()
_filesystems: dict[tuple[StorageConfig, str], tuple[pafs.S3FileSystem, object]] = {}


def _frozen_credentials():
    """A snapshot of this process's AWS credentials, refreshed first when they expire within the margin."""
    creds = _boto_session().get_credentials()
    if creds is None:
        return None
    # RefreshableCredentials (roles, IRSA, SSO, credential_process) refresh inside this call once they expire
    # within 15 minutes, so a snapshot taken here is good for at least 10 (botocore's mandatory margin).
    return creds.get_frozen_credentials()


def _s3_filesystem(cfg: StorageConfig, region: str) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem for ``cfg`` and ``region``, rebuilt whenever the credentials changed: pyarrow keeps
    the keys it was given, so a process must never hold one past the credentials' expiry."""
    frozen = _frozen_credentials()
    key = (cfg, region)
    with _fs_lock:
        held = _filesystems.get(key)
        if held is not None and held[1] == frozen:
            return held[0]
        fs = _build_s3_filesystem(cfg, region, frozen)
        _filesystems[key] = (fs, frozen)
        return fs


def _build_s3_filesystem(cfg: StorageConfig, region: str, frozen) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if frozen is not None:
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
        if frozen.token:
            kwargs["session_token"] = frozen.token
    else:
        kwargs["anonymous"] = True
    if cfg.endpoint_url:
        scheme, _, host = cfg.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    # pyarrow 26 has no checksum option: its AWS SDK reads the variable when the client is built (measured against
    # s3rver: Parquet written with it set reads back, without it not), so it is set for the construction only.
    name, saved = "AWS_REQUEST_CHECKSUM_CALCULATION", os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION")
    os.environ[name] = cfg.checksum_mode
    try:
        return pafs.S3FileSystem(
            region=region,
            connect_timeout=cfg.connect_timeout_s,
            request_timeout=cfg.request_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts),
            **kwargs,
        )
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def filesystem(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for ``uri`` (``bucket/key`` for S3, absolute path locally)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3_filesystem(cfg, bucket_region(bucket, cfg)), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


class ObjectTooLarge(ValueError):
    """An object is over the byte limit the caller set; it was not read (a permanent, per-object error)."""


def read_bytes(uri: str, cfg: StorageConfig, *, max_bytes: int | None = None) -> bytes:
    """Whole-object read. S3 goes through boto3, which keeps keys literal ('a/../b' is a legal key that pyarrow
    would normalise away) and retries per ``cfg``; a missing object raises FileNotFoundError either way.

    ``max_bytes``: refuse a bigger object before reading its body (ObjectTooLarge): the size comes from the GET's
    headers on S3 and from fstat locally, so a 6 GB object never reaches memory.
    """
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            response = s3_client(cfg).get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NoSuchBucket"):
                raise FileNotFoundError(f"no object at {uri}") from e
            raise
        body = response["Body"]
        with contextlib.closing(body):
            _check_size(int(response.get("ContentLength") or 0), max_bytes, uri)
            return body.read()
    with open(Path(uri).expanduser(), "rb") as f:
        _check_size(os.fstat(f.fileno()).st_size, max_bytes, uri)
        return f.read()


def _check_size(size: int, max_bytes: int | None, uri: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ObjectTooLarge(
            f"{uri} is {size:,} bytes, over read.max_bytes ({max_bytes:,}): not read; raise read.max_bytes "
            "if such objects are images"
        )


def write_bytes(uri: str, data: bytes, cfg: StorageConfig) -> None:
    """Write atomically: a reader sees the old object, nothing, or the whole new object, never a partial one.

    S3 PUTs (single or multipart) only appear on completion; locally we write a temp file and rename it.
    """
    if is_s3(uri):
        fs, path = filesystem(uri, cfg)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    path = Path(uri).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_files(prefix: str, cfg: StorageConfig, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All object URIs (or file paths) under ``prefix``, recursively, sorted; hidden/temp files excluded."""
    suffixes = tuple(s.lower() for s in suffixes) if suffixes else None
    out: list[str] = []
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        paginator = s3_client(cfg).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                name = obj["Key"]
                if not name.endswith("/") and _listable(name[len(key) :], suffixes):
                    out.append(f"s3://{bucket}/{name}")
    else:
        root = Path(prefix).expanduser()
        if root.is_dir():
            for p in root.rglob("*"):
                if p.is_file() and _listable(p.relative_to(root).as_posix(), suffixes):
                    out.append(str(p))
    return sorted(out)


def _listable(rel: str, suffixes: tuple[str, ...] | None) -> bool:
    # Hidden names (.DS_Store, our own .<name>.tmp files) are not data; '.' and '..' are legal S3 key segments.
    if any(part.startswith(".") and part not in (".", "..") for part in rel.split("/")):
        return False
    return suffixes is None or rel.lower().endswith(suffixes)


def exists(uri: str, cfg: StorageConfig) -> bool:
    fs, path = filesystem(uri, cfg)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete(uri: str, cfg: StorageConfig) -> None:
    fs, path = filesystem(uri, cfg)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_tree(prefix: str, cfg: StorageConfig) -> None:
    """Remove every object under ``prefix`` (a local folder or an S3 prefix); nothing there is fine."""
    if not is_s3(prefix):
        import shutil

        shutil.rmtree(Path(prefix).expanduser(), ignore_errors=True)
        return
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/"
    client = s3_client(cfg)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def check_access(uri: str, cfg: StorageConfig, *, what: str) -> None:
    """Fail fast with a message naming the fix when ``uri``'s bucket (or local parent) can't be reached."""
    if not is_s3(uri):
        if what == "input" and not Path(uri).expanduser().exists():
            raise StorageError(f"{what} path {uri} does not exist: check the path")
        return
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket, _ = split_s3(uri)
    endpoint = cfg.endpoint_url or "AWS S3"
    try:
        s3_client(cfg).head_bucket(Bucket=bucket)
    except EndpointConnectionError as e:
        raise StorageError(
            f"cannot reach the S3 endpoint {endpoint} for the {what} {uri}: is it running? "
            "Fix storage.endpoint_url (or AWS_ENDPOINT_URL)"
        ) from e
    except NoCredentialsError as e:
        raise StorageError(
            f"no AWS credentials found for the {what} {uri}: set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, or use an instance role / service account"
        ) from e
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise StorageError(
                f"bucket {bucket!r} for the {what} {uri} does not exist at {endpoint}: create it or fix the URI"
            ) from e
        if code in ("403", "AccessDenied"):
            raise StorageError(
                f"access denied to bucket {bucket!r} for the {what} {uri}: check the credentials' permissions"
            ) from e
        raise StorageError(redact(f"S3 error for the {what} {uri}: {code} {e}")) from e
