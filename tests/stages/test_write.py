"""Write stage: committed parts, the done and retry indexes, and superseding an error row without two rows or none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.stages.write import (
    MASKS_DIR,
    SUPERSEDE_DIR,
    apply_supersedes,
    commit_rows,
    index_parts,
    load_done,
    pending_supersedes,
    write_part,
)
from pipeline.storage import StorageConfig, list_files

LOCAL = StorageConfig()


def _rows(ids: list[str], status: list[str], retryable: list[bool], supersedes: list[str] | None = None):
    n = len(ids)
    cols = {name: [None] * n for name in S.OUTPUT_SCHEMA.names}
    cols.update(
        {
            S.ID: ids,
            S.SOURCE: [f"src/{i}.jpg" for i in ids],
            S.STATUS: status,
            S.ERROR: [None if s == S.OK else f"{s} for {i}" for i, s in zip(ids, status, strict=True)],
            S.RETRYABLE: retryable,
            "mask_png": [
                b"png-" + i.encode() if s == S.OK else None for i, s in zip(ids, status, strict=True)
            ],
        }
    )
    table = pa.Table.from_pydict(cols, schema=S.OUTPUT_SCHEMA)
    if supersedes is not None:
        table = table.append_column(S.SUPERSEDES, pa.array(supersedes, pa.string()))
    return table


def _all_rows(out: Path) -> list[dict]:
    rows = []
    for uri in list_files(str(out / MASKS_DIR), LOCAL, (".parquet",)):
        rows.extend(pq.read_table(uri).to_pylist())
    return rows


def test_index_leaves_out_the_rows_to_retry_per_policy(tmp_path):
    part = write_part(
        _rows(["a", "b", "c", "d"], [S.OK, S.ErrorKind.READ, S.ErrorKind.DECODE, S.ErrorKind.DCNN],
              [False, True, False, True]),
        str(tmp_path), LOCAL,
    )  # fmt: skip
    name = part.rsplit("/", 1)[1]
    for policy, expected in (("retryable", ["b", "d"]), ("all", ["b", "c", "d"]), ("none", [])):
        _, _, summary, retry = index_parts([part], LOCAL, retry=policy)
        got = retry.parts_of(["a", "b", "c", "d", "e"])
        assert [i for i, p in zip("abcde", got, strict=True) if p] == expected, policy
        assert set(got) <= {"", name}
        assert (summary.rows, summary.retryable, summary.retry) == (4, 2, len(expected))
    # A part written before the column existed: read, its errors are not retryable (never deleted as unreadable).
    old = tmp_path / "old"
    legacy = _rows(["x", "y"], [S.OK, S.ErrorKind.READ], [False, False]).drop_columns([S.RETRYABLE])
    (old / MASKS_DIR).mkdir(parents=True)
    pq.write_table(legacy, old / MASKS_DIR / "part-legacy.parquet")
    done, summary = load_done(str(old), LOCAL)
    assert done.contains(["x", "y"]).all() and summary.retryable == 0 and not summary.unreadable


def test_a_retried_row_supersedes_the_old_one_in_one_rewrite(tmp_path):
    """Aside first (readers of masks/ still see the old row), then one atomic rewrite under the same name; applying
    again (a kill before the aside files were deleted) changes nothing."""
    out = str(tmp_path)
    first = write_part(
        _rows(["a", "b", "c"], [S.OK, S.ErrorKind.READ, S.ErrorKind.READ], [False, True, True]), out, LOCAL
    )
    name = first.rsplit("/", 1)[1]
    # A re-run's batch: a new image (its own part) and the retried rows of b and c, one still failing.
    batch = _rows(["b", "c", "z"], [S.OK, S.ErrorKind.READ, S.OK], [False, True, False], [name, name, ""])
    summaries = commit_rows(batch, out, LOCAL)
    assert sorted(summaries.column("rows").to_pylist()) == [1, 2]
    assert summaries.column("retryable").to_pylist().count(1) == 1
    by_id = {r[S.ID]: r for r in _all_rows(tmp_path)}
    assert (
        sorted(by_id) == ["a", "b", "c", "z"] and by_id["b"][S.STATUS] == S.ErrorKind.READ
    )  # not yet applied
    pending = pending_supersedes(out, LOCAL)
    assert list(pending) == [name] and len(pending[name]) == 1
    aside = Path(pending[name][0]).read_bytes()

    assert apply_supersedes(pending, out, LOCAL) == 2
    rows = _all_rows(tmp_path)
    assert sorted(r[S.ID] for r in rows) == ["a", "b", "c", "z"]  # one row each
    by_id = {r[S.ID]: r for r in rows}
    assert by_id["b"][S.STATUS] == S.OK and by_id["b"]["mask_png"] == b"png-b"
    assert by_id["c"][S.RETRYABLE] and by_id["a"]["mask_png"] == b"png-a"
    assert (tmp_path / MASKS_DIR / name).exists()  # same name: its ids did not change
    assert not list_files(str(tmp_path / SUPERSEDE_DIR), LOCAL)

    # Killed after the rewrite, before the aside file was deleted: applying it again is a no-op.
    Path(pending[name][0]).parent.mkdir(parents=True, exist_ok=True)
    Path(pending[name][0]).write_bytes(aside)
    assert apply_supersedes(pending_supersedes(out, LOCAL), out, LOCAL) == 2
    assert sorted(r[S.ID] for r in _all_rows(tmp_path)) == ["a", "b", "c", "z"]
    done, summary = load_done(out, LOCAL)
    assert summary.rows == 4 and summary.duplicates == 0 and summary.retryable == 1
    assert np.array_equal(done.contains(["a", "b", "c", "z", "q"]), [True, True, True, True, False])


def test_load_done_applies_what_a_killed_run_left_aside(tmp_path):
    out = str(tmp_path)
    name = write_part(_rows(["a", "b"], [S.OK, S.ErrorKind.READ], [False, True]), out, LOCAL).rsplit("/", 1)[
        1
    ]
    commit_rows(_rows(["b"], [S.OK], [False], [name]), out, LOCAL)  # then the run died
    _, summary = load_done(out, LOCAL)
    assert summary.status_counts == {S.OK: 2} and summary.retryable == 0 and summary.rows == 2
    assert not pending_supersedes(out, LOCAL)
