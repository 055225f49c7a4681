"""MIT-SHM for python-xlib: the few protocol requests the worker needs and a SysV segment it owns."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from Xlib import X
from Xlib.error import CatchError
from Xlib.protocol import rq

extname = "MIT-SHM"

IPC_PRIVATE = 0
IPC_CREAT = 0o1000
IPC_RMID = 0

SEG = rq.Card32


class ShmError(Exception):
    """MIT-SHM cannot be used on this connection (absent, or the server refused to attach)."""


class QueryVersion(rq.ReplyRequest):
    _request = rq.Struct(
        rq.Card8("opcode"),
        rq.Opcode(0),
        rq.RequestLength(),
    )
    _reply = rq.Struct(
        rq.ReplyCode(),
        rq.Bool("shared_pixmaps"),
        rq.Card16("sequence_number"),
        rq.ReplyLength(),
        rq.Card16("major_version"),
        rq.Card16("minor_version"),
        rq.Card16("uid"),
        rq.Card16("gid"),
        rq.Card8("pixmap_format"),
        rq.Pad(15),
    )


class Attach(rq.Request):
    _request = rq.Struct(
        rq.Card8("opcode"),
        rq.Opcode(1),
        rq.RequestLength(),
        SEG("shmseg"),
        rq.Card32("shmid"),
        rq.Bool("read_only"),
        rq.Pad(3),
    )


class Detach(rq.Request):
    _request = rq.Struct(
        rq.Card8("opcode"),
        rq.Opcode(2),
        rq.RequestLength(),
        SEG("shmseg"),
    )


class GetImage(rq.ReplyRequest):
    _request = rq.Struct(
        rq.Card8("opcode"),
        rq.Opcode(4),
        rq.RequestLength(),
        rq.Drawable("drawable"),
        rq.Int16("x"),
        rq.Int16("y"),
        rq.Card16("width"),
        rq.Card16("height"),
        rq.Card32("plane_mask"),
        rq.Card8("format"),
        rq.Pad(3),
        SEG("shmseg"),
        rq.Card32("offset"),
    )
    _reply = rq.Struct(
        rq.ReplyCode(),
        rq.Card8("depth"),
        rq.Card16("sequence_number"),
        rq.ReplyLength(),
        rq.Card32("visual"),
        rq.Card32("size"),
        rq.Pad(16),
    )


def _opcode(self) -> int:
    return self.display.get_extension_major(extname)


def query_version(self):
    return QueryVersion(display=self.display, opcode=_opcode(self))


def attach(self, shmseg: int, shmid: int, read_only: bool = False, onerror=None) -> None:
    Attach(
        display=self.display,
        opcode=_opcode(self),
        shmseg=shmseg,
        shmid=shmid,
        read_only=read_only,
        onerror=onerror,
    )


def detach(self, shmseg: int, onerror=None) -> None:
    Detach(display=self.display, opcode=_opcode(self), shmseg=shmseg, onerror=onerror)


def get_image(self, drawable, x, y, width, height, shmseg, offset=0, plane_mask=0xFFFFFFFF):
    return GetImage(
        display=self.display,
        opcode=_opcode(self),
        drawable=drawable,
        x=x,
        y=y,
        width=width,
        height=height,
        plane_mask=plane_mask,
        format=X.ZPixmap,
        shmseg=shmseg,
        offset=offset,
    )


def init(disp) -> bool:
    """Register shm_* methods on a connected Display; False if the server has no MIT-SHM.

    python-xlib loads only the extensions it ships, so this is called by hand after connecting.
    """
    if "shm_get_image" in disp.display_extension_methods:
        return True
    info = disp.query_extension(extname)
    if info is None:
        return False
    # get_extension_major reads this cache, filled for built-in extensions at connect time.
    disp.display.extension_major_opcodes[extname] = info.major_opcode
    disp.extension_add_method("display", "shm_query_version", query_version)
    disp.extension_add_method("display", "shm_attach", attach)
    disp.extension_add_method("display", "shm_detach", detach)
    disp.extension_add_method("display", "shm_get_image", get_image)
    return True


class _Libc:
    """shmget/shmat/shmdt/shmctl from libc, loaded once."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.shmget = lib.shmget
        self.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
        self.shmget.restype = ctypes.c_int
        self.shmat = lib.shmat
        self.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        self.shmat.restype = ctypes.c_void_p
        self.shmdt = lib.shmdt
        self.shmdt.argtypes = [ctypes.c_void_p]
        self.shmdt.restype = ctypes.c_int
        self.shmctl = lib.shmctl
        self.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        self.shmctl.restype = ctypes.c_int


_libc: _Libc | None = None


def _get_libc() -> _Libc:
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


class ShmSegment:
    """A private SysV segment attached here and in the X server; close() detaches both sides.

    The segment is marked IPC_RMID as soon as the server has attached it, so the kernel frees it
    when the last attachment goes, even if this process is killed.
    """

    def __init__(self, disp, size: int) -> None:
        libc = _get_libc()
        self.size = size
        self._disp = disp
        self._addr: int | None = None
        self._xid: int | None = None
        # 0600: only this uid (and root) may attach; a server running as another uid will refuse,
        # which the caller treats as "no SHM" and falls back to GetImage.
        shmid = libc.shmget(IPC_PRIVATE, size, IPC_CREAT | 0o600)
        if shmid < 0:
            err = ctypes.get_errno()
            raise ShmError(f"shmget({size}) failed: {os.strerror(err)}")
        self.shmid = shmid
        try:
            addr = libc.shmat(shmid, None, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                err = ctypes.get_errno()
                raise ShmError(f"shmat failed: {os.strerror(err)}")
            self._addr = addr
            xid = disp.display.allocate_resource_id()
            catcher = CatchError()
            disp.shm_attach(xid, shmid, False, onerror=catcher)
            # A round trip so an asynchronous BadAccess arrives before we rely on the segment.
            disp.sync()
            if catcher.get_error() is not None:
                disp.display.free_resource_id(xid)
                raise ShmError(f"X server refused to attach the segment: {catcher.get_error()}")
            self._xid = xid
        except BaseException:
            libc.shmctl(shmid, IPC_RMID, None)
            self._detach_local()
            raise
        libc.shmctl(shmid, IPC_RMID, None)
        self.buffer = (ctypes.c_char * size).from_address(self._addr)

    @property
    def xid(self) -> int:
        if self._xid is None:
            raise ShmError("segment is closed")
        return self._xid

    def memoryview(self) -> memoryview:
        return memoryview(self.buffer).cast("B")

    def _detach_local(self) -> None:
        if self._addr is not None:
            _get_libc().shmdt(self._addr)
            self._addr = None

    def close(self, connection_alive: bool = True) -> None:
        """Detach from the server (if the connection still works) and from this process."""
        if self._xid is not None:
            xid, self._xid = self._xid, None
            if connection_alive:
                try:
                    self._disp.shm_detach(xid, onerror=CatchError())
                    self._disp.sync()
                except Exception:  # noqa: BLE001 - the connection may be gone; the kernel cleans up
                    pass
        self.buffer = None
        self._detach_local()
