"""gstreamer.place_registry: a worker whose home is read-only keeps GStreamer's registry in a
directory of its own uid in the shared /tmp, never in one another user made first. Run as a
real other user (spice-test-a), in a sticky world-writable directory like /tmp."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.bus import ensure_test_user

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import json, os, sys
sys.path.insert(0, {service!r})
from spice_stream_worker.gstreamer import place_registry
path = place_registry({parent!r})
print(json.dumps({{"path": path, "env": os.environ.get("GST_REGISTRY_1_0")}}))
"""


@pytest.fixture
def shared():
    """A directory like /tmp: anyone may create entries, nobody may remove another's (in a new
    directory of root's that others can pass through: pytest's own is closed to them)."""
    top = tempfile.mkdtemp(prefix="spice-gstreg-")
    os.chmod(top, 0o755)
    d = os.path.join(top, "tmp")
    os.mkdir(d)
    os.chmod(d, 0o1777)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(top)


def probe(user: str, parent, home: str = "/", extra_env: dict | None = None) -> dict:
    pw = ensure_test_user(user)
    env = {"PATH": "/usr/bin:/bin", "HOME": home, **(extra_env or {})}
    out = subprocess.run(
        ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
         sys.executable, "-I", "-c", PROBE.format(service=os.path.join(ROOT, "service"),
                                                  parent=str(parent))],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.splitlines()[-1]) | ({"said": out.stderr.strip()} if out.stderr else {})


def test_a_user_whose_home_cannot_be_written_gets_a_directory_of_its_own(shared):
    got = probe("spice-test-a", shared)
    uid = ensure_test_user("spice-test-a").pw_uid
    want = shared / f"spice-stream-worker-{uid}"
    assert got == {"path": str(want / "registry.bin"), "env": str(want / "registry.bin")}
    st = os.lstat(want)
    assert st.st_uid == uid and st.st_mode & 0o777 == 0o700
    # The second worker of that user uses it again.
    assert probe("spice-test-a", shared)["path"] == str(want / "registry.bin")


def test_a_directory_another_user_made_first_is_not_used(shared):
    victim = ensure_test_user("spice-test-a").pw_uid
    planted = shared / f"spice-stream-worker-{victim}"
    planted.mkdir(mode=0o700)
    attacker = ensure_test_user("spice-test-b")
    os.chown(planted, attacker.pw_uid, attacker.pw_gid)
    assert probe("spice-test-a", shared) == {"path": None, "env": None, "said": REFUSED % planted}


REFUSED = "GStreamer's registry is not kept: %s is not this user's own directory"


def test_a_symlink_in_its_place_is_not_followed(shared):
    pw = ensure_test_user("spice-test-a")
    target = shared.parent / "elsewhere"
    target.mkdir(mode=0o700)
    os.chown(target, pw.pw_uid, pw.pw_gid)  # even a directory the user owns: not through a link
    link = shared / f"spice-stream-worker-{pw.pw_uid}"
    link.symlink_to(target)
    assert probe("spice-test-a", shared) == {"path": None, "env": None, "said": REFUSED % link}


def test_a_directory_open_to_others_is_not_used(shared):
    pw = ensure_test_user("spice-test-a")
    d = shared / f"spice-stream-worker-{pw.pw_uid}"
    d.mkdir()
    os.chown(d, pw.pw_uid, pw.pw_gid)
    os.chmod(d, 0o777)
    assert probe("spice-test-a", shared) == {"path": None, "env": None, "said": REFUSED % d}


def test_a_writable_cache_or_a_registry_already_named_is_left_alone(shared):
    pw = ensure_test_user("spice-test-a")
    home = shared.parent / "home"
    (home / ".cache").mkdir(parents=True)
    os.chown(home / ".cache", pw.pw_uid, pw.pw_gid)
    assert probe("spice-test-a", shared, home=str(home)) == {"path": None, "env": None}
    assert probe("spice-test-a", shared, extra_env={"GST_REGISTRY_1_0": "/x/r.bin"}) == {
        "path": None, "env": "/x/r.bin"}
    assert not any(shared.iterdir())
