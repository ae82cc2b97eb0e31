"""Cluster operation, client side: `deeplab submit` / `deeplab jobs` over Ray's Job Submission API.

The job runs on the cluster as ``python -m jobs.<name> ...`` with this project shipped as the runtime env's
``working_dir``. Authentication is explicit: a token (argument, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``, Ray's own order) goes into the ``Authorization`` header and is never printed or logged.
Environment variables given to the job are stored in the job's runtime env on the cluster (the dashboard shows
them), so object-storage credentials should come from the instance role or service account instead.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import re
import shlex
import sys
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

__all__ = [
    "DEFAULT_ADDRESS",
    "EXCLUDES",
    "EXIT_CODES",
    "SubmitError",
    "build_runtime_env",
    "job_logs",
    "job_status",
    "jobs_main",
    "make_client",
    "parse_env_args",
    "repo_root",
    "resolve_address",
    "check_transport",
    "resolve_auth_token",
    "stop_job",
    "submit_job",
    "submit_main",
    "wait_for_job",
]

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Not shipped to the cluster: environments, VCS data, caches, test data and local run outputs. Ray also honours
# .gitignore; these are here so a working dir without one (or with a local venv under another name) stays small.
EXCLUDES = (
    ".venv/",
    "venv/",
    ".git/",
    "tests/data/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    "build/",
    "work/",
    "demo-work/",
    "*.log",
)
# Final job status -> process exit code of `deeplab submit` / `deeplab jobs status`.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
_UNKNOWN_EXIT = 4
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SESSION|PRIVATE|(^|_)KEY($|_)", re.IGNORECASE
)
_JOB_NAME = re.compile(r"[a-z][a-z0-9_]*")


class SubmitError(RuntimeError):
    """A submission or job-API failure, with a message safe to print (no token, no env values)."""


def repo_root() -> Path:
    """The project root this module belongs to: the default ``working_dir`` shipped with a job."""
    return Path(__file__).resolve().parents[2]


def resolve_address(address: str | None = None) -> str:
    """Dashboard URL: the argument, else RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS, else 127.0.0.1:8265."""
    for candidate in (address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if candidate and candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
        if candidate and candidate is address:
            raise SubmitError(f"address must be the dashboard URL (http://HOST:8265), got {candidate!r}")
    return DEFAULT_ADDRESS


def resolve_auth_token(
    token: str | None = None, token_file: str | os.PathLike[str] | None = None
) -> str | None:
    """The cluster token, or None when none is configured (an auth-disabled cluster).

    Order: ``token``, ``token_file``, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ``~/.ray/auth_token`` (Ray's own order
    after the explicit arguments). A named file that is missing or empty is an error, not a silent fallback.
    """
    if token:
        return token.strip()
    named = token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token_file and os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if named:
        path = Path(named).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as e:
            raise SubmitError(f"token file {path} is not readable: {e.strerror}") from None
        if not value:
            raise SubmitError(f"token file {path} is empty; expected the cluster's auth token")
        return value
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        value = default.read_text().strip()
        return value or None
    return None


def make_client(address: str | None = None, *, auth_token: str | None = None):
    """A ``JobSubmissionClient`` for the dashboard at ``address``, sending ``auth_token`` as a bearer header."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as e:  # Ray raises bare RuntimeError/ConnectionError; keep the token out of the message
        raise SubmitError(f"cannot reach the Ray job API at {url}: {_scrub(str(e), auth_token)}") from None


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def build_runtime_env(
    working_dir: str | os.PathLike[str], env_vars: Mapping[str, str] | None = None, *, excludes=EXCLUDES
) -> dict:
    """The runtime env that carries this project: ``working_dir`` (on sys.path and cwd of every worker)."""
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise SubmitError(f"working_dir must be a directory, got {str(root)!r}")
    env: dict = {"working_dir": str(root), "excludes": list(excludes)}
    if env_vars:
        bad = sorted(k for k in env_vars if k.startswith("RAY_AUTH_"))
        if bad:
            raise SubmitError(f"the cluster's auth settings are not job env vars; remove {bad}")
        risky = sorted(k for k in env_vars if _SECRET_NAME.search(k))
        if risky:
            # Names only: values must never reach a log.
            log.warning(
                "env vars %s look like credentials; they are stored in the job's runtime env on the cluster "
                "(visible in the dashboard). Prefer the instance role / service account.",
                risky,
            )
        env["env_vars"] = dict(env_vars)
    return env


def _status_name(status) -> str:
    return getattr(status, "value", str(status))


def wait_for_job(client, submission_id: str, *, timeout_s: float = 3600.0, poll_s: float = 0.5) -> str:
    """Poll until the job reaches a terminal status; returns it (``SUCCEEDED``, ``FAILED``, ``STOPPED``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = _status_name(client.get_job_status(submission_id))
        if status in _TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise SubmitError(f"job {submission_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


async def _tail(client, submission_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        out.write(chunk)
        out.flush()


def submit_job(
    address: str,
    entrypoint_args: list[str],
    *,
    working_dir: str | os.PathLike[str],
    env_vars: dict[str, str] | None,
    follow: bool = True,
    auth_token: str | None = None,
    submission_id: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Submit ``entrypoint_args`` (run on the head, inside ``working_dir``) and return an exit code.

    Prints the submission id. With ``follow`` the job's logs stream to ``out`` and the return value is the final
    status mapped by ``EXIT_CODES`` (0 only for SUCCEEDED); without it, 0 once the job is accepted.
    ``auth_token`` is used as given (None: no header); the CLI resolves it with ``resolve_auth_token``.
    """
    out = out or sys.stdout
    if not entrypoint_args:
        raise SubmitError(
            "entrypoint_args is empty; expected a command such as ['python', '-m', 'jobs.segment']"
        )
    runtime_env = build_runtime_env(working_dir, env_vars)
    client = make_client(address, auth_token=auth_token)
    entrypoint = shlex.join(entrypoint_args)
    try:
        sid = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
    except Exception as e:
        raise SubmitError(f"job submission to {address} failed: {_scrub(str(e), auth_token)}") from None
    print(f"submitted {sid}", file=out, flush=True)
    log.info("submitted %s: %s (env var names: %s)", sid, entrypoint, sorted(env_vars or {}))
    if not follow:
        return 0
    try:
        asyncio.run(_tail(client, sid, out))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. `deeplab jobs stop {sid}` stops it.", file=out)
        return 130
    except RuntimeError as e:
        # The log websocket can drop (head restart, proxy timeout); the job's status is still authoritative.
        log.warning(
            "log stream for %s ended early: %s; waiting for the final status", sid, _scrub(str(e), auth_token)
        )
    status = wait_for_job(client, sid)
    print(f"job {sid} {status}", file=out, flush=True)
    return EXIT_CODES.get(status, _UNKNOWN_EXIT)


def job_status(address: str, submission_id: str, *, auth_token: str | None = None) -> str:
    """The job's current status name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    client = make_client(address, auth_token=auth_token)
    try:
        return _status_name(client.get_job_status(submission_id))
    except Exception as e:
        raise SubmitError(f"status of {submission_id}: {_scrub(str(e), auth_token)}") from None


def job_logs(address: str, submission_id: str, *, auth_token: str | None = None) -> str:
    """Everything the job's driver has written so far."""
    client = make_client(address, auth_token=auth_token)
    try:
        return client.get_job_logs(submission_id)
    except Exception as e:
        raise SubmitError(f"logs of {submission_id}: {_scrub(str(e), auth_token)}") from None


def stop_job(address: str, submission_id: str, *, auth_token: str | None = None) -> bool:
    """Ask the cluster to stop the job; True if it was running and a stop was requested."""
    client = make_client(address, auth_token=auth_token)
    try:
        return bool(client.stop_job(submission_id))
    except Exception as e:
        raise SubmitError(f"stop {submission_id}: {_scrub(str(e), auth_token)}") from None


def parse_env_args(items: list[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``NAME=VALUE`` as given, ``NAME`` copied from the local environment (so values stay off the command line)."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SubmitError(f"--env expects NAME or NAME=VALUE with a valid variable name, got {name!r}")
        if not sep:
            if name not in environ:
                raise SubmitError(f"--env {name}: not set in the local environment")
            value = environ[name]
        env[name] = value
    return env


@dataclass(frozen=True)
class _Conn:
    address: str
    auth_token: str | None


def _add_conn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address", help=f"dashboard URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, {DEFAULT_ADDRESS})"
    )
    p.add_argument(
        "--token-file",
        help="file holding the cluster's auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain http:// to a non-loopback address (the token and the job travel unencrypted)",
    )


def check_transport(address: str, *, insecure: bool = False) -> None:
    """Refuse plain ``http://`` to anything but this machine unless ``insecure``: the bearer token, the job's
    arguments and its ``--env`` values would cross the network in clear text."""
    parsed = urllib.parse.urlsplit(address)
    if parsed.scheme != "http" or insecure or _is_loopback(parsed.hostname or ""):
        return
    raise SubmitError(
        f"refusing plain http:// to {parsed.hostname}: the token and the job would travel unencrypted. Use "
        "https:// (e.g. through a TLS proxy or `kubectl port-forward` to 127.0.0.1), or pass --insecure"
    )


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: only "localhost" is known to stay on this machine
        return False


def _conn(args: argparse.Namespace) -> _Conn:
    address = resolve_address(args.address)
    check_transport(address, insecure=getattr(args, "insecure", False))
    return _Conn(address, resolve_auth_token(token_file=args.token_file))


def _available_jobs(working_dir: Path) -> list[str]:
    return sorted(p.stem for p in (working_dir / "jobs").glob("*.py") if _JOB_NAME.fullmatch(p.stem))


def submit_main(argv: list[str] | None = None) -> int:
    """``deeplab submit [options] JOB [-- JOB_ARGS...]``: run ``python -m jobs.JOB JOB_ARGS`` on a Ray cluster.

    Without ``--``, everything after JOB is passed to the job; with it, options may also follow JOB.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="deeplab submit", description=submit_main.__doc__)
    _add_conn_args(parser)
    parser.add_argument(
        "--working-dir", default=None, help="project dir shipped to the cluster (default: this repo)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="env var for the job; NAME alone copies the local value. Prefer instance roles for credentials.",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    parser.add_argument("--submission-id", help="explicit id (default: generated by Ray)")
    parser.add_argument("job", help="job module under jobs/, e.g. segment")
    if "--" in argv:
        cut = argv.index("--")
        args = parser.parse_args(argv[:cut])
        job_args = argv[cut + 1 :]
    else:
        parser.add_argument("job_args", nargs=argparse.REMAINDER, help="arguments for the job")
        args = parser.parse_args(argv)
        job_args = args.job_args
    try:
        working_dir = Path(args.working_dir or repo_root()).resolve()
        if not args.working_dir and not (working_dir / "pyproject.toml").exists():
            # An installed (non-editable) package would otherwise ship all of site-packages.
            raise SubmitError(f"{working_dir} is not a project checkout; pass --working-dir PROJECT_DIR")
        known = _available_jobs(working_dir)
        if args.job not in known:
            raise SubmitError(
                f"unknown job {args.job!r}: expected one of {known} (modules jobs/*.py in {working_dir})"
            )
        conn = _conn(args)
        return submit_job(
            conn.address,
            ["python", "-m", f"jobs.{args.job}", *job_args],
            working_dir=working_dir,
            env_vars=parse_env_args(args.env) or None,
            follow=not args.no_wait,
            auth_token=conn.auth_token,
            submission_id=args.submission_id,
        )
    except SubmitError as e:
        print(f"deeplab submit: {e}", file=sys.stderr)
        return 2


def jobs_main(argv: list[str] | None = None) -> int:
    """``deeplab jobs status|logs|stop|list [ID]``: inspect or stop jobs on a Ray cluster."""
    parser = argparse.ArgumentParser(prog="deeplab jobs", description=jobs_main.__doc__)
    _add_conn_args(parser)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser(
        "status", help="print the status; exit 0 SUCCEEDED, 1 FAILED, 3 STOPPED, 5 still running"
    )
    p.add_argument("id")
    p = sub.add_parser("logs", help="print the logs so far (--follow: stream until the job ends)")
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true")
    p = sub.add_parser("stop", help="stop a running job")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    sub.add_parser("list", help="submission ids, statuses and entrypoints")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        conn = _conn(args)
        if args.action == "status":
            status = job_status(conn.address, args.id, auth_token=conn.auth_token)
            print(status)
            return EXIT_CODES.get(status, 5)
        if args.action == "logs":
            if args.follow:
                client = make_client(conn.address, auth_token=conn.auth_token)
                asyncio.run(_tail(client, args.id, sys.stdout))
            else:
                sys.stdout.write(job_logs(conn.address, args.id, auth_token=conn.auth_token))
            return 0
        if args.action == "stop":
            requested = stop_job(conn.address, args.id, auth_token=conn.auth_token)
            if args.wait:
                status = wait_for_job(make_client(conn.address, auth_token=conn.auth_token), args.id)
                print(f"{args.id} {status}")
            else:
                print(f"{args.id} stop {'requested' if requested else 'not needed (job not running)'}")
            return 0
        client = make_client(conn.address, auth_token=conn.auth_token)
        for job in client.list_jobs():
            print(f"{job.submission_id}\t{_status_name(job.status)}\t{job.entrypoint}")
        return 0
    except SubmitError as e:
        print(f"deeplab jobs: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
