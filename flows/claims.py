"""Old import path of ``flows.store.claims``, kept for one release (see CHANGELOG.md)."""

from flows.store.claims import (  # noqa: F401
    claim_prompts,
    claimed_keys,
    expire_claims,
    record_claimed_generation,
    release_claims,
    renew_claims,
)
