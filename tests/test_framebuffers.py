"""The service's framebuffer grants to the scanout reader: only what the display shows, bounded in
rate and in outstanding handles, over the real grant socket with the reader's own client."""

from __future__ import annotations

import asyncio
import errno
import logging
import os

import pytest

from spice_stream_common import fbgrant, kms
from spice_streamd import framebuffers
from spice_streamd.framebuffers import FramebufferGrants


class FakeCard:
    """kms.Card's answers from a table: CRTC 40 shows framebuffer 70, the cursor plane 80."""

    def __init__(self, *, handles: bool = True, master: bool = False) -> None:
        self.fd = 99
        self.shown = {"crtc": 70, "cursor": 80}
        self.handles = handles
        self.master = master
        self.open_handles: set[int] = set()
        self.closed = False
        self.fail: OSError | None = None

    def drop_master(self) -> bool:
        return self.master

    def crtcs(self) -> list[kms.Crtc]:
        return [kms.Crtc(40, self.shown["crtc"], 0, 0, 1024, 768, 60), kms.Crtc(41, 0, 0, 0, 0, 0, 0)]

    def plane_ids(self) -> list[int]:
        return [30, 31]

    def plane(self, plane_id: int, props: bool = True) -> kms.Plane:
        assert not props  # GETPLANE alone: the grant needs no more
        fb = self.shown["crtc" if plane_id == 30 else "cursor"]
        return kms.Plane(plane_id, 40, fb, 1, "", 0, 0)

    def framebuffer(self, fb_id: int, handle: bool = True) -> kms.Framebuffer:
        if self.fail is not None:
            raise self.fail
        h = 0
        if handle and self.handles:
            h = min(set(range(1, len(self.open_handles) + 2)) - self.open_handles)  # as the kernel
            self.open_handles.add(h)
        return kms.Framebuffer(fb_id, 1024, 768, kms.fourcc("XR24"), 4096, 0, 0, h)

    def close_handle(self, h: int) -> None:
        self.open_handles.discard(h)

    def close(self) -> None:
        self.closed = True
        self.fd = -1


@pytest.fixture
def card() -> FakeCard:
    return FakeCard()


def grants_for(card: FakeCard, now: list[float] | None = None) -> FramebufferGrants:
    clock = (lambda: now[0]) if now is not None else (lambda: 0.0)
    return FramebufferGrants("/dev/dri/card0", card=card, clock=clock)  # type: ignore[arg-type]


def test_only_a_framebuffer_on_the_display_gets_a_handle(card: FakeCard, caplog) -> None:
    g = grants_for(card)
    try:
        assert g.grant(70) == (1, 0)
        assert g.grant(80) == (2, 0)  # the cursor plane's
        with caplog.at_level(logging.WARNING):
            assert g.grant(71) == (0, errno.EPERM)
        assert "no handle for framebuffer 71: not on the display now" in caplog.text
        assert card.open_handles == {1, 2}
        card.shown["crtc"] = 72  # a flip: 70 is no longer shown
        assert g.grant(70) == (0, errno.EPERM)
        assert g.grant(72) == (3, 0)
    finally:
        g.close()


def test_no_cap_sys_admin_and_kernel_errors_are_refusals(card: FakeCard) -> None:
    card.handles = False
    g = grants_for(card)
    try:
        assert g.grant(70) == (0, errno.EPERM)
        card.fail = kms.KmsError(errno.ENOENT, "GETFB2(70): No such file or directory")
        assert g.grant(70) == (0, errno.ENOENT)
        assert g.refused == 2 and g.granted == 0
    finally:
        g.close()


def test_grants_are_rate_limited(card: FakeCard) -> None:
    now = [0.0]
    g = grants_for(card, now)
    try:
        answers = []
        for _ in range(framebuffers.GRANT_BURST + 5):
            handle, err = g.grant(70)
            answers.append(err)
            card.open_handles.discard(handle)  # the reader closes each one once mapped
        assert answers.count(0) == framebuffers.GRANT_BURST
        assert answers[-1] == errno.EAGAIN
        now[0] += 1.0
        assert g.grant(70)[1] == 0  # GRANTS_PER_S more a second later
    finally:
        g.close()


def test_a_reader_that_keeps_its_handles_gets_no_more(card: FakeCard, caplog) -> None:
    """The kernel gives the lowest free number: a reader that closes each handle gets the same
    number again and again; one that keeps them gets new numbers, and past MAX_OUTSTANDING none
    (the one just made is closed). A granted handle is never closed by the service."""
    now = [0.0]
    g = grants_for(card, now)
    try:
        for _ in range(framebuffers.MAX_OUTSTANDING + 5):  # the reader closes each one
            now[0] += 1.0  # within the rate limit
            handle, err = g.grant(70)
            assert (handle, err) == (1, 0)
            card.open_handles.discard(handle)
        for _ in range(framebuffers.MAX_OUTSTANDING):  # now it keeps them: 1, 2, 3, ...
            now[0] += 1.0
            assert g.grant(70)[1] == 0
        kept = set(card.open_handles)
        assert kept == set(range(1, framebuffers.MAX_OUTSTANDING + 1))
        now[0] += 1.0
        with caplog.at_level(logging.WARNING):
            assert g.grant(70) == (0, errno.EMFILE)
        assert card.open_handles == kept  # the refused one was closed, the granted ones not
        assert "keeps 8 handles open" in caplog.text
    finally:
        g.close()
    assert card.closed


def test_dropping_master_is_said(card: FakeCard, caplog) -> None:
    card.master = True
    with caplog.at_level(logging.INFO):
        grants_for(card).close()
    assert "DRM master dropped" in caplog.text


def test_the_reader_client_gets_its_handles_over_the_socket(card: FakeCard) -> None:
    async def run() -> None:
        g = grants_for(card)
        card_fd, grant_fd = g.reader_fds()
        assert card_fd == 99
        reader_end = os.dup(grant_fd)  # what the reader inherits
        g.started()
        client = fbgrant.GrantClient(reader_end)
        loop = asyncio.get_running_loop()
        try:
            assert await loop.run_in_executor(None, client.handle, 70) == 1
            with pytest.raises(fbgrant.GrantRefused) as refused:
                await loop.run_in_executor(None, client.handle, 99)
            assert refused.value.errno == errno.EPERM
            assert await loop.run_in_executor(None, client.handle, 80) == 2
        finally:
            g.close()
            with pytest.raises(fbgrant.GrantRefused):  # the service's end is gone
                await loop.run_in_executor(None, client.handle, 70)
            client.close()

    asyncio.run(run())


def test_a_reader_that_floods_requests_and_reads_no_answer_is_no_longer_read(card, caplog):
    """A hostile reader writes requests without end and never reads the answers: the service
    stops reading its grant socket once its answers no longer fit, holds a bounded amount of its
    requests, and keeps running."""
    async def run() -> None:
        g = grants_for(card)
        reader_end = os.dup(g.reader_fds()[1])
        g.started()
        os.set_blocking(reader_end, False)
        request = fbgrant.REQUEST.pack(70) * 1024
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        try:
            while g._reading:
                assert loop.time() < deadline, "the service still reads the flooding reader"
                try:
                    os.write(reader_end, request)
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.001)
                # at most one read (4 KiB) past the limit: then it is no longer read
                assert len(g._pending) <= framebuffers.MAX_PENDING_BYTES + 4096
                for h in list(card.open_handles):  # as a reader that maps and closes them
                    card.open_handles.discard(h)
        finally:
            g.close()
            os.close(reader_end)

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())
