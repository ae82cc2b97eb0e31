"""Job submission against a real `ray start --head` on 127.0.0.1 (token auth on), plus the offline pieces."""

from __future__ import annotations

import io
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cluster.localhead import LocalHead
from pipeline.cluster.submit import (
    EXCLUDES,
    SubmitError,
    build_runtime_env,
    job_logs,
    job_status,
    jobs_main,
    parse_env_args,
    repo_root,
    resolve_address,
    resolve_auth_token,
    stop_job,
    submit_job,
    submit_main,
)

# Every test here starts a subprocess job, a Ray head or the demo: the integration tier.
pytestmark = pytest.mark.integration

TOKEN = "test-token-5f1c0a9e2b7d4c3a"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """One local head for the module: 2 CPUs, 1 logical GPU, RAY_AUTH_MODE=token with a known token."""
    with LocalHead(
        tmp_path_factory.mktemp("head"), num_cpus=2, num_gpus=1, auth_mode="token", token=TOKEN
    ) as h:
        yield h


# --- against the head --------------------------------------------------------------------------------------------


def test_submit_job_carries_project_and_succeeds(head):
    probe = textwrap.dedent(
        """
        import os, sys, pipeline, ray
        ray.init()
        print("PYTHON", sys.executable)
        print("PIPELINE_FROM", os.path.relpath(pipeline.__file__, os.getcwd()))
        print("IN_RUNTIME_ENV", "working_dir_files" in os.getcwd())
        print("HAS_LOCALHEAD", os.path.exists("pipeline/cluster/localhead.py"))
        print("SHIPPED_VENV", os.path.exists(".venv"))
        print("GPUS", ray.cluster_resources().get("GPU"))
        print("MARK_LEN", len(os.environ.get("DEEPLAB_TEST_MARK", "")))
        """
    )
    out = io.StringIO()
    rc = submit_job(
        head.dashboard_url,
        ["python", "-c", probe],
        working_dir=repo_root(),
        env_vars={"DEEPLAB_TEST_MARK": "s3cr3t-value"},
        auth_token=TOKEN,
        out=out,
    )
    text = out.getvalue()
    assert rc == 0, text
    assert "submitted raysubmit_" in text
    # The job imported the shipped copy of the project (cwd = unpacked working_dir), not the local checkout.
    assert "PIPELINE_FROM pipeline/__init__.py" in text
    assert "IN_RUNTIME_ENV True" in text and "HAS_LOCALHEAD True" in text
    assert "SHIPPED_VENV False" in text
    # "python" in the entrypoint is the interpreter that started the head, with or without an activated venv.
    assert f"PYTHON {sys.executable}\n" in text
    assert "GPUS 1.0" in text  # the job's own ray.init() authenticated against the token-mode cluster
    assert "MARK_LEN 12" in text  # the env var reached the job ...
    assert "SUCCEEDED" in text
    assert "s3cr3t-value" not in text  # ... and its value was never echoed by the submitter
    assert TOKEN not in text


def test_failing_entrypoint_gives_nonzero_status(head):
    out = io.StringIO()
    rc = submit_job(
        head.dashboard_url,
        ["python", "-c", "import sys; print('about to fail'); sys.exit(3)"],
        working_dir=repo_root(),
        env_vars=None,
        auth_token=TOKEN,
        out=out,
    )
    assert rc == 1, out.getvalue()
    assert "about to fail" in out.getvalue() and "FAILED" in out.getvalue()


def test_wrong_token_is_rejected_without_leaking_it(head):
    with pytest.raises(SubmitError) as err:
        submit_job(
            head.dashboard_url, ["true"], working_dir=repo_root(), env_vars=None, auth_token="wrong-9x7"
        )
    assert "wrong-9x7" not in str(err.value)
    assert "Authentication" in str(err.value) or "403" in str(err.value)


def test_cli_submit_status_logs_and_stop(head, tmp_path, capsys):
    # A project dir of its own, so the CLI's `jobs.<name>` lookup and module run are exercised end to end.
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "__init__.py").write_text("")
    (tmp_path / "jobs" / "hello.py").write_text("import sys\nprint('hello job args', sys.argv[1:])\n")
    (tmp_path / "jobs" / "sleeper.py").write_text(
        "import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n"
    )
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    conn = ["--address", head.dashboard_url, "--token-file", str(token_file)]

    rc = submit_main([*conn, "--working-dir", str(tmp_path), "hello", "--", "--input", "s3://b/in"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "hello job args ['--input', 's3://b/in']" in out
    sid = next(w for w in out.split() if w.startswith("raysubmit_"))

    assert jobs_main([*conn, "status", sid]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert jobs_main([*conn, "logs", sid]) == 0
    assert "hello job args" in capsys.readouterr().out

    rc = submit_main([*conn, "--working-dir", str(tmp_path), "--no-wait", "sleeper"])
    sid = next(w for w in capsys.readouterr().out.split() if w.startswith("raysubmit_"))
    assert rc == 0
    deadline = time.monotonic() + 60  # RUNNING comes before the entrypoint's python prints: wait for its line
    while (
        "sleeping" not in job_logs(head.dashboard_url, sid, auth_token=TOKEN) and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert job_status(head.dashboard_url, sid, auth_token=TOKEN) == "RUNNING"
    assert jobs_main([*conn, "stop", sid, "--wait"]) == 0
    assert f"{sid} STOPPED" in capsys.readouterr().out
    assert job_status(head.dashboard_url, sid, auth_token=TOKEN) == "STOPPED"
    assert jobs_main([*conn, "status", sid]) == 3
    assert "sleeping" in job_logs(head.dashboard_url, sid, auth_token=TOKEN)
    assert stop_job(head.dashboard_url, sid, auth_token=TOKEN) is False  # already stopped


# --- offline -------------------------------------------------------------------------------------------------------


def test_unknown_job_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "segment.py").write_text("")
    rc = submit_main(["--address", "http://127.0.0.1:1", "--working-dir", str(tmp_path), "segmnet", "--x"])
    assert rc == 2
    assert "unknown job 'segmnet'" in capsys.readouterr().err


def test_auth_token_resolution_order(tmp_path, monkeypatch):
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_auth_token() is None  # no token anywhere: an auth-disabled cluster
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert resolve_auth_token() == "from-home"
    path_file = tmp_path / "tok"
    path_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_file))
    assert resolve_auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert resolve_auth_token() == "from-env"
    arg_file = tmp_path / "arg"
    arg_file.write_text("from-arg-file")
    assert resolve_auth_token(token_file=arg_file) == "from-arg-file"
    assert resolve_auth_token("explicit", token_file=arg_file) == "explicit"
    (tmp_path / "empty").write_text("")
    with pytest.raises(SubmitError, match="empty"):
        resolve_auth_token(token_file=tmp_path / "empty")
    with pytest.raises(SubmitError, match="not readable"):
        resolve_auth_token(token_file=tmp_path / "missing")


def test_address_resolution(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not a dashboard URL: skipped
    assert resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert resolve_address() == "http://head:8265"
    assert resolve_address("https://x:1") == "https://x:1"
    with pytest.raises(SubmitError, match="dashboard URL"):
        resolve_address("head:6379")


def test_runtime_env_ships_project_without_venv_or_auth(caplog):
    env = build_runtime_env(repo_root(), {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "MY_SECRET_KEY": "v4lue"})
    assert env["working_dir"] == str(repo_root())
    assert {".venv/", ".git/", "tests/data/"} <= set(env["excludes"]) and env["excludes"] == list(EXCLUDES)
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "MY_SECRET_KEY" in caplog.text and "v4lue" not in caplog.text  # warned by name, value never logged
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN"):
        build_runtime_env(repo_root(), {"RAY_AUTH_TOKEN": "x"})
    with pytest.raises(SubmitError, match="directory"):
        build_runtime_env(Path(repo_root()) / "missing-dir")


def test_parse_env_args_copies_local_values():
    assert parse_env_args(["A=1", "B"], {"B": "two"}) == {"A": "1", "B": "two"}
    assert parse_env_args(["C=x=y"], {}) == {"C": "x=y"}
    with pytest.raises(SubmitError, match="not set"):
        parse_env_args(["MISSING"], {})
    with pytest.raises(SubmitError, match="valid variable name"):
        parse_env_args(["1BAD=x"], {})
