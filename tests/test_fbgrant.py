"""The framebuffer-handle grant client (spice_stream_common/fbgrant.py) over a real socket pair."""

from __future__ import annotations

import errno
import signal
import socket
import threading
import time

import pytest

from spice_stream_common import fbgrant
from spice_stream_common.fbgrant import REPLY, REQUEST, GrantClient, GrantRefused


@pytest.fixture(autouse=True)
def deadline():
    """A client stuck in its read loop fails the test instead of hanging the run."""

    def expired(signum, frame):
        raise TimeoutError("the grant client is still waiting")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = GrantClient(ours.detach())
    try:
        yield client, theirs
    finally:
        client.close()
        theirs.close()


def serve(sock: socket.socket, *writes: bytes, delay: float = 0.0,
          hang_up: bool = False) -> threading.Thread:
    """The service's side: read one request, then send `writes` (`delay` apart), then with
    `hang_up` close its end."""
    seen: list[int] = []

    def run():
        data = b""
        while len(data) < REQUEST.size:
            chunk = sock.recv(REQUEST.size - len(data))
            if not chunk:
                return
            data += chunk
        seen.append(REQUEST.unpack(data)[0])
        for i, w in enumerate(writes):
            if i and delay:
                time.sleep(delay)
            sock.sendall(w)
        if hang_up:
            sock.shutdown(socket.SHUT_RDWR)

    t = threading.Thread(target=run, daemon=True)
    t.seen = seen
    t.start()
    return t


def test_a_good_answer_gives_the_handle(pair):
    client, theirs = pair
    t = serve(theirs, REPLY.pack(42, 7, 0))
    assert client.handle(42) == 7
    t.join(2)
    assert t.seen == [42]


def test_a_refusal_says_why(pair):
    client, theirs = pair
    serve(theirs, REPLY.pack(42, 0, errno.ENOENT))
    with pytest.raises(GrantRefused) as info:
        client.handle(42)
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, OSError)


def test_a_refusal_without_errno_is_eperm(pair):
    client, theirs = pair
    serve(theirs, REPLY.pack(42, 0, 0))
    with pytest.raises(GrantRefused) as info:
        client.handle(42)
    assert info.value.errno == errno.EPERM


def test_an_answer_for_another_framebuffer_is_refused(pair):
    client, theirs = pair
    serve(theirs, REPLY.pack(43, 7, 0))
    with pytest.raises(GrantRefused) as info:
        client.handle(42)
    assert info.value.errno == errno.EPROTO


def test_the_service_closing_after_the_request(pair):
    client, theirs = pair
    t = serve(theirs, REPLY.pack(42, 9, 0)[:5], hang_up=True)  # half an answer, then gone
    with pytest.raises(GrantRefused) as info:
        client.handle(42)
    assert info.value.errno == errno.EPIPE
    t.join(2)
    assert t.seen == [42]


def test_the_service_gone_before_the_request(pair):
    client, theirs = pair
    theirs.close()
    with pytest.raises(GrantRefused) as info:  # the write's EPIPE, as a refusal
        client.handle(42)
    assert info.value.errno == errno.EPIPE


def test_an_answer_in_two_writes(pair):
    client, theirs = pair
    answer = REPLY.pack(42, 9, 0)
    t = serve(theirs, answer[:5], answer[5:], delay=0.05)
    assert client.handle(42) == 9
    t.join(2)


def test_two_answers_in_one_read_are_both_used(pair):
    client, theirs = pair
    theirs.sendall(REPLY.pack(42, 9, 0) + REPLY.pack(43, 10, 0))
    assert client.handle(42) == 9
    assert client.handle(43) == 10  # from what the first read got, no wait
    assert theirs.recv(64) == REQUEST.pack(42) + REQUEST.pack(43)


def test_no_answer_in_time(pair, monkeypatch):
    client, theirs = pair
    monkeypatch.setattr(fbgrant, "ANSWER_TIMEOUT_S", 0.2)
    start = time.monotonic()
    with pytest.raises(GrantRefused) as info:
        client.handle(42)
    assert info.value.errno == errno.ETIMEDOUT
    assert 0.15 < time.monotonic() - start < 1.5
    assert theirs.recv(64) == REQUEST.pack(42)


def test_close_is_idempotent(pair):
    client, _ = pair
    client.close()
    client.close()
    assert client.fd == -1


def test_a_late_answer_is_not_taken_for_the_next_requests(pair, monkeypatch):
    client, theirs = pair
    monkeypatch.setattr(fbgrant, "ANSWER_TIMEOUT_S", 0.1)
    with pytest.raises(GrantRefused):
        client.handle(42)  # the service is slow: no answer in time
    theirs.sendall(REPLY.pack(42, 7, 0))  # ... then answers it, late
    theirs.sendall(REPLY.pack(42, 8, 0))  # and the same framebuffer asked again
    assert client.handle(42) == 8  # not 7: that answer was the first request's
    theirs.sendall(REPLY.pack(43, 9, 0))
    assert client.handle(43) == 9
    assert theirs.recv(64) == REQUEST.pack(42) * 2 + REQUEST.pack(43)


def test_late_answers_of_several_timeouts_are_all_dropped(pair, monkeypatch):
    client, theirs = pair
    monkeypatch.setattr(fbgrant, "ANSWER_TIMEOUT_S", 0.05)
    for fb_id in (42, 43):
        with pytest.raises(GrantRefused) as info:
            client.handle(fb_id)
        assert info.value.errno == errno.ETIMEDOUT
    theirs.sendall(REPLY.pack(42, 7, 0) + REPLY.pack(43, 0, errno.EPERM))
    with pytest.raises(GrantRefused) as info:
        client.handle(44)  # only the two late answers came: this one's is still owed
    assert info.value.errno == errno.ETIMEDOUT
    theirs.sendall(REPLY.pack(44, 10, 0) + REPLY.pack(45, 11, 0))
    assert client.handle(45) == 11
