"""The scanout reader's DRM device and the framebuffer handles the service grants it: the device
opened read-only (never left DRM master), and each handle given only for a framebuffer the display
shows now, at a bounded rate, never more than a few outstanding."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable

from spice_stream_common import fbgrant, kms
from spice_stream_common.ratelimit import LogLimiter, TokenBucket

log = logging.getLogger(__name__)

# A compositor flips between two or three framebuffers and keeps them: a new one appears at a mode
# set or a VT switch. Past this rate the reader is not reading a display, it is asking for handles.
GRANTS_PER_S = 10.0
GRANT_BURST = 20
# Handles the reader keeps open: it closes each one once it has mapped it (a mapping outlives its
# handle), and the kernel gives out the lowest free number, so the numbers granted stay few. A reader
# that keeps them grows the set: past this many distinct numbers it gets no more. The service never
# closes a granted handle itself: the reader may have closed it and the number may be another
# buffer's by now.
MAX_OUTSTANDING = 8
MAX_PENDING_BYTES = 64 * fbgrant.REQUEST.size


def find_card(root: str = "/dev/dri") -> str | None:
    """The DRM device that drives a display: the first card with a CRTC showing a picture, else
    the first card (a display may be off just now)."""
    paths = kms.cards(root)
    for path in paths:
        try:
            with kms.Card(path) as card:
                if any(c.fb_id and c.width for c in card.crtcs()):
                    return path
        except OSError:
            continue
    return paths[0] if paths else None


class FramebufferGrants:
    """One scanout reader's device and grant socket. reader_fds() are handed to the reader (its
    --card-fd and --grant-fd); the service keeps its own end and answers requests on the event
    loop; close() closes the service's ends (the reader's copies go with the reader)."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.monotonic,
                 card: kms.Card | None = None) -> None:
        """Opens `path` (or takes `card`, which it then owns)."""
        self.card = card if card is not None else kms.Card(path)
        try:
            if self.card.drop_master():
                # Nobody was master when we opened it (a text console): a display server that
                # starts now must be able to become master.
                log.info("scanout: %s opened while no display server held it: DRM master dropped",
                         path)
            self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except BaseException:
            self.card.close()
            raise
        self._ours.setblocking(False)
        self._bucket = TokenBucket(GRANTS_PER_S, GRANT_BURST, clock=clock)
        self._refusals = LogLimiter(log)
        self._numbers: set[int] = set()  # handle numbers granted
        self._pending = b""
        self._reading = False
        self.granted = 0
        self.refused = 0

    def reader_fds(self) -> tuple[int, int]:
        """(the device, the reader's end of the grant socket), to pass to the reader."""
        return self.card.fd, self._theirs.fileno()

    def started(self) -> None:
        """The reader has its copies: close the service's copy of the reader's end, answer."""
        self._theirs.close()
        asyncio.get_running_loop().add_reader(self._ours.fileno(), self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        try:
            data = self._ours.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._stop_reading()
            return
        self._pending += data
        if len(self._pending) > MAX_PENDING_BYTES:  # it asks without reading the answers
            self._refusals.log(logging.WARNING, "flood", "scanout reader: %d bytes of requests "
                               "unanswered: grant socket closed", len(self._pending))
            self._stop_reading()
            return
        size = fbgrant.REQUEST.size
        while len(self._pending) >= size:
            (fb_id,), self._pending = fbgrant.REQUEST.unpack(self._pending[:size]), self._pending[size:]
            handle, err = self.grant(fb_id)
            try:
                self._ours.send(fbgrant.REPLY.pack(fb_id, handle, err))
            except OSError:
                self._stop_reading()
                return

    def grant(self, fb_id: int) -> tuple[int, int]:
        """(handle, 0) for a framebuffer the display shows now, else (0, errno), logged."""
        if not self._bucket.allow("grant"):
            return self._refuse(fb_id, errno.EAGAIN, f"more than {GRANTS_PER_S:g} grants a second")
        try:
            if not self._is_shown(fb_id):
                return self._refuse(fb_id, errno.EPERM, "not on the display now")
            handle = self.card.framebuffer(fb_id).handle
        except kms.KmsError as exc:
            return self._refuse(fb_id, exc.errno or errno.EIO, str(exc))
        if not handle:
            return self._refuse(fb_id, errno.EPERM, "the kernel gave no handle (no CAP_SYS_ADMIN)")
        if handle not in self._numbers and len(self._numbers) >= MAX_OUTSTANDING:
            # Just made, not yet the reader's: ours to close.
            self.card.close_handle(handle)
            return self._refuse(fb_id, errno.EMFILE, f"it keeps {len(self._numbers)} handles open")
        self._numbers.add(handle)
        self.granted += 1
        return handle, 0

    def _is_shown(self, fb_id: int) -> bool:
        """Whether a CRTC or a plane shows the framebuffer now. The CRTCs first (the picture: the
        reader asks for it about once a second), then the planes by GETPLANE alone (a cursor)."""
        if any(c.fb_id == fb_id for c in self.card.crtcs()):
            return True
        return any(self.card.plane(p, props=False).fb_id == fb_id for p in self.card.plane_ids())

    def _refuse(self, fb_id: int, err: int, why: str) -> tuple[int, int]:
        self.refused += 1
        self._refusals.log(logging.WARNING, err, "scanout reader: no handle for framebuffer %d: %s",
                           fb_id, why)
        return 0, err

    def _stop_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._ours.fileno())
            self._reading = False

    def close(self) -> None:
        """The service's ends: its copy of the device (the handles in it go with the reader's
        copy, the same open file) and its end of the socket."""
        self._stop_reading()
        for s in (self._ours, self._theirs):
            s.close()
        if self.card.fd >= 0:
            # The handles go with the open file, once the reader's copy of it is closed too.
            self.card.close()

