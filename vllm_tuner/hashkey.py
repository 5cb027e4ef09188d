"""The one short key of JSON-able data (a request, an environment, a plan): sixteen hex digits of SHA-256.

Stored runs are found again by these exact strings, so the JSON form each caller hashes never changes.
"""

from __future__ import annotations

import hashlib
import json


def stable_key(value: object, *, compact: bool = True) -> str:
    """A short stable hash of ``value`` as JSON with sorted keys. ``compact=False`` keeps JSON's default
    separators: the form find's requests and the environment fingerprints were first hashed in."""
    separators = (",", ":") if compact else None
    blob = json.dumps(value, sort_keys=True, separators=separators, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
