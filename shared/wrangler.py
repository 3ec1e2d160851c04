"""Where wrangler (miniflare) keeps a local D1 database or Workers KV namespace under its state
folder (`.wrangler/state`): `v3/<d1|kv>/<object class>/<HMAC of the id>.sqlite`, with a KV
namespace's values in `v3/kv/<namespace id>/blobs/`. The file name is miniflare's own
derivation, so Sluice reads the files wrangler writes without asking wrangler."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

D1_OBJECT = "miniflare-D1DatabaseObject"
KV_OBJECT = "miniflare-KVNamespaceObject"


def object_filename(object_id: str, object_class: str) -> str:
    """miniflare's file name for a durable object's SQLite file."""
    key = hashlib.sha256(object_class.encode()).digest()
    name_hmac = hmac.new(key, object_id.encode(), hashlib.sha256).digest()[:16]
    mac = hmac.new(key, name_hmac, hashlib.sha256).digest()[:16]
    return (name_hmac + mac).hex() + ".sqlite"


def d1_path(state_dir: Path, database_id: str) -> Path:
    return state_dir / "v3" / "d1" / D1_OBJECT / object_filename(database_id, D1_OBJECT)


def kv_index_path(state_dir: Path, namespace_id: str) -> Path:
    return state_dir / "v3" / "kv" / KV_OBJECT / object_filename(namespace_id, KV_OBJECT)


def kv_blobs_dir(state_dir: Path, namespace_id: str) -> Path:
    return state_dir / "v3" / "kv" / namespace_id / "blobs"
