"""The README's first command: the demo runs the whole chain and writes a picture a person can open."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image, ImageStat

pytestmark = pytest.mark.slow


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo starts polkitd and switches uids: root only")
def test_demo_streams_and_writes_the_last_frame(tmp_path):
    res = subprocess.run([sys.executable, "-m", "spice_streamd.demo", "--seconds", "2",
                          "--output", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "registered: VT 2" in res.stdout and "0 protocol violations" in res.stdout
    frames = int(res.stdout.split("done: ")[1].split()[0])
    assert frames >= 10, res.stdout
    with Image.open(tmp_path / "last-frame.png") as img:
        assert img.size == (1024, 768)
        # The desktop blue dominates: the picture is the demo's screen, not a black or blank frame.
        r, g, b = ImageStat.Stat(img.convert("RGB")).mean
        assert b > r + 40 and b > 80
