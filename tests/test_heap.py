"""The service's heap: relaying 1080p frames from a worker's socket costs no page faults per frame."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# In a process of its own: mallopt changes the whole process, and the fault count must be its own.
RELAY_FRAMES = textwrap.dedent("""
    import asyncio, resource, sys, threading
    from spice_stream_common import protocol as p
    from spice_streamd import heap
    from spice_streamd.workerchannel import WorkerChannel, socket_pair

    if sys.argv[1] == "keep":
        assert heap.keep_frame_buffers()
    WARM, FRAMES = 10, 60
    # What a worker sends: a 1080p JPEG's size, in a message; the service re-frames it for the port.
    frame = p.encode(p.MsgType.DATA, b"\\xff\\xd8" + bytes(range(256)) * 1170)

    async def main():
        ours, theirs = socket_pair()
        got, faults = [], []
        done = asyncio.Event()

        def deliver(msg):
            if msg.type != p.MsgType.DATA:
                return
            got.append(len(p.encode(msg.type, msg.payload)))
            if len(got) in (WARM, WARM + FRAMES):
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
            if len(got) == WARM + FRAMES:
                done.set()

        WorkerChannel(ours, label="worker", check=lambda m: None, deliver=deliver, relayed=True)
        theirs.sendall(p.format_msg(1920, 1080))  # a frame is bounded by its FORMAT
        sender = threading.Thread(target=lambda: [theirs.sendall(frame) for _ in range(WARM + FRAMES)])
        sender.start()
        await asyncio.wait_for(done.wait(), 30)
        sender.join()
        assert set(got) == {len(frame)}
        print((faults[1] - faults[0]) / FRAMES)

    asyncio.run(main())
""")


def faults_per_frame(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", RELAY_FRAMES, mode], capture_output=True,
                         text=True, timeout=60, check=True)
    return float(out.stdout)


def test_frames_reuse_the_heap():
    # A 300 KB frame spans 73 pages; glibc's default maps each big buffer anew (62 faults a frame
    # here without it, about 220 in the service): a bound of 10 holds only if buffers are reused.
    kept = faults_per_frame("keep")
    assert kept < 10, f"{kept:.0f} page faults per relayed frame with the frame buffers kept"
