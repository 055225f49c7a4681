"""The scanout reader's request for a framebuffer handle and the service's answer: fixed-size
records on a socket of their own, the reader's half and the framing both sides share.

The kernel gives a framebuffer's buffer handle (DRM GETFB2) only to the DRM master or a process
with CAP_SYS_ADMIN. The reader has neither: it asks the service, which checks that the framebuffer
is on the display now and asks the kernel on the reader's own open file of the device (the same
open file, so the handle is the reader's to map and close).
"""

from __future__ import annotations

import errno
import os
import select
import struct
import time

REQUEST = struct.Struct("<I")  # fb_id
REPLY = struct.Struct("<IIi")  # fb_id, handle (0: refused), errno of the refusal
ANSWER_TIMEOUT_S = 2.0


class GrantRefused(OSError):
    """The service gave no handle: the framebuffer is no longer shown, or it said why not."""


class GrantClient:
    """The reader's side: one request, one answer, in order (the reader asks for a handle only
    when a framebuffer it has not mapped appears on the display: a few times a mode set).

    The service answers every request, in order, late or not: the answer to a request that timed
    out comes before the next request's and is dropped (a handle it carries is left open: this
    side has no card to close it on, and the service closes the oldest past MAX_OUTSTANDING)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = b""
        self._stale = 0  # answers still to come for requests that timed out

    def handle(self, fb_id: int) -> int:
        try:
            os.write(self.fd, REQUEST.pack(fb_id))
        except OSError as exc:
            raise GrantRefused(exc.errno, f"cannot ask the service for framebuffer {fb_id}: "
                                          f"{exc.strerror}") from None
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while True:
            answer = self._answer(fb_id, deadline)
            if not self._stale:
                break
            self._stale -= 1  # a late answer to an earlier request: not this one's
        got_fb, handle, err = REPLY.unpack(answer)
        if got_fb != fb_id:
            raise GrantRefused(errno.EPROTO, f"answer for framebuffer {got_fb}, asked {fb_id}")
        if not handle:
            raise GrantRefused(err or errno.EPERM, f"no handle for framebuffer {fb_id}: "
                                                   f"{os.strerror(err or errno.EPERM)}")
        return handle

    def _answer(self, fb_id: int, deadline: float) -> bytes:
        """The next answer on the socket, waited for until `deadline`."""
        while len(self._pending) < REPLY.size:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self._stale += 1  # this request's answer, when it comes
                raise GrantRefused(errno.ETIMEDOUT, f"the service did not answer for framebuffer "
                                                    f"{fb_id} in {ANSWER_TIMEOUT_S:g} s")
            data = os.read(self.fd, 64)
            if not data:
                raise GrantRefused(errno.EPIPE, "the service closed the grant socket")
            self._pending += data
        answer, self._pending = self._pending[:REPLY.size], self._pending[REPLY.size:]
        return answer

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
