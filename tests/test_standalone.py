"""The checkout stands on its own: no tracked file reaches for material beside the checkout."""

import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Written in pieces so that this file does not match its own pattern.
BESIDE_THE_CHECKOUT = re.compile(rb"\.\./" + rb"shared|shared/" + rb"yalm")


def test_no_tracked_file_mentions_material_beside_the_checkout():
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True, timeout=60
    ).stdout
    names = [name.decode() for name in listed.split(b"\0") if name]
    assert "tests/test_standalone.py" in names
    offenders = []
    for name in names:
        path = REPO_ROOT / name
        if path.is_file() and BESIDE_THE_CHECKOUT.search(path.read_bytes()):
            offenders.append(name)
    assert not offenders, f"these tracked files reach beside the checkout: {offenders}"
