"""Output identity: what an output's masks were made from, recorded by its first run and checked by every other.

Done-ness is keyed on image ids, so a second input with the same ids (other pixels), another model or other CRF
settings pointed at an existing output would find every id "done" and silently mix results. The first run writes
``OUTPUT/_identity.json`` (input, labels, model digest, CRF settings; a VOC split only picks a subset of one input,
so it is recorded but not compared); a later run with other values
refuses in one line naming both, unless ``write.allow_identity_change`` (``--allow-identity-change``) says the
change is meant, which records the new identity and keeps the old ones in its history.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from pipeline.storage import StorageConfig, join, read_bytes, write_bytes

__all__ = ["IDENTITY", "FIELDS", "identity_of", "check_identity"]

log = logging.getLogger(__name__)

IDENTITY = "_identity.json"
# What must match for rows to mean the same thing (the split is recorded, not compared: it picks a subset).
FIELDS = ("input", "labels", "model_digest", "crf")
_NAMES = {"input": "input", "labels": "labels", "model_digest": "model", "crf": "CRF settings"}


def identity_of(
    input_uri: str, labels_uri: str | None, split: str | None, model_digest: str, crf: dict[str, Any] | None
) -> dict[str, Any]:
    """The identity of a run's rows (URIs without a trailing '/'; ``crf`` None when the CRF is off)."""
    return {
        "input": input_uri.rstrip("/"),
        "labels": labels_uri.rstrip("/") if labels_uri else None,
        "split": split,
        "model_digest": model_digest,
        "crf": crf,
    }


def _show(field: str, value: Any) -> str:
    if field == "crf":
        return "off" if value is None else json.dumps(value, sort_keys=True)
    if field == "model_digest" and value:
        return f"sha256:{str(value).removeprefix('sha256:')[:12]}"
    return str(value)


def check_identity(
    output_uri: str,
    storage_cfg: StorageConfig,
    identity: dict[str, Any],
    *,
    allow_change: bool,
    record: bool = True,
) -> str | None:
    """Record ``identity`` in a new output, or compare it with the recorded one (``record=False``: only compare).

    Returns None when the run may go on (the identity is recorded, or matches), else the one-line refusal.
    """
    uri = join(output_uri, IDENTITY)
    try:
        recorded = json.loads(read_bytes(uri, storage_cfg))
    except FileNotFoundError:
        recorded = None
    now = datetime.now(UTC).isoformat()
    if recorded is None:
        if record:
            write_bytes(uri, _dump({**identity, "recorded": now, "history": []}), storage_cfg)
        return None
    changed = [f for f in FIELDS if recorded.get(f) != identity.get(f)]
    if not changed:
        return None
    diffs = "; ".join(
        f"{_NAMES[f]} {_show(f, recorded.get(f))} there, {_show(f, identity.get(f))} in this run"
        for f in changed
    )
    if not allow_change:
        return (
            f"the output {output_uri} holds masks of another {'/'.join(_NAMES[f] for f in changed)} ({diffs}): "
            "use another --output, or pass --allow-identity-change to add this run's rows to it"
        )
    if not record:
        return None
    log.warning("the output %s changes identity (%s): allowed by --allow-identity-change", output_uri, diffs)
    history = [*recorded.pop("history", []), recorded]
    write_bytes(uri, _dump({**identity, "recorded": now, "history": history}), storage_cfg)
    return None


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode()
