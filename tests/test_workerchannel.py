"""The worker's socket: a whole 1080p frame fits in flight, so the worker writes it in one go."""

from __future__ import annotations

import os

import pytest

from spice_streamd.workerchannel import socket_pair


@pytest.mark.skipif(os.geteuid() != 0, reason="the service (root) sets the buffer past wmem_max")
def test_a_whole_frame_goes_in_one_write():
    ours, theirs = socket_pair()
    try:
        theirs.setblocking(False)
        frame = b"\xff" * 600_000  # a 1080p JPEG is about 300 KB; the default buffer takes ~200 KB
        assert theirs.send(frame) == len(frame)
    finally:
        ours.close()
        theirs.close()
