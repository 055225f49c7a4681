"""The kernel's DRM/KMS interface, the few ioctls a scanout reader needs (drm.h, drm_mode.h): which
framebuffer each CRTC and plane shows, its format and pitch, and a read-only mapping of its pixels."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

# _IOC from asm-generic/ioctl.h: direction 2 bits, size 14, type 8 ('d' for DRM), number 8.
_IOC_WRITE, _IOC_READ = 1, 2
_DRM = ord("d")


def _iowr(nr: int, struct: type[ctypes.Structure]) -> int:
    return ((_IOC_READ | _IOC_WRITE) << 30) | (ctypes.sizeof(struct) << 16) | (_DRM << 8) | nr


def _iow(nr: int, struct: type[ctypes.Structure]) -> int:
    return (_IOC_WRITE << 30) | (ctypes.sizeof(struct) << 16) | (_DRM << 8) | nr


class _CardRes(ctypes.Structure):  # struct drm_mode_card_res
    _fields_ = [("fb_id_ptr", ctypes.c_uint64), ("crtc_id_ptr", ctypes.c_uint64),
                ("connector_id_ptr", ctypes.c_uint64), ("encoder_id_ptr", ctypes.c_uint64),
                ("count_fbs", ctypes.c_uint32), ("count_crtcs", ctypes.c_uint32),
                ("count_connectors", ctypes.c_uint32), ("count_encoders", ctypes.c_uint32),
                ("min_width", ctypes.c_uint32), ("max_width", ctypes.c_uint32),
                ("min_height", ctypes.c_uint32), ("max_height", ctypes.c_uint32)]


class _ModeInfo(ctypes.Structure):  # struct drm_mode_modeinfo
    _fields_ = [("clock", ctypes.c_uint32),
                ("hdisplay", ctypes.c_uint16), ("hsync_start", ctypes.c_uint16),
                ("hsync_end", ctypes.c_uint16), ("htotal", ctypes.c_uint16), ("hskew", ctypes.c_uint16),
                ("vdisplay", ctypes.c_uint16), ("vsync_start", ctypes.c_uint16),
                ("vsync_end", ctypes.c_uint16), ("vtotal", ctypes.c_uint16), ("vscan", ctypes.c_uint16),
                ("vrefresh", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("type", ctypes.c_uint32),
                ("name", ctypes.c_char * 32)]


class _Crtc(ctypes.Structure):  # struct drm_mode_crtc
    _fields_ = [("set_connectors_ptr", ctypes.c_uint64), ("count_connectors", ctypes.c_uint32),
                ("crtc_id", ctypes.c_uint32), ("fb_id", ctypes.c_uint32),
                ("x", ctypes.c_uint32), ("y", ctypes.c_uint32), ("gamma_size", ctypes.c_uint32),
                ("mode_valid", ctypes.c_uint32), ("mode", _ModeInfo)]


class _FbCmd2(ctypes.Structure):  # struct drm_mode_fb_cmd2
    _fields_ = [("fb_id", ctypes.c_uint32), ("width", ctypes.c_uint32), ("height", ctypes.c_uint32),
                ("pixel_format", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("handles", ctypes.c_uint32 * 4), ("pitches", ctypes.c_uint32 * 4),
                ("offsets", ctypes.c_uint32 * 4), ("modifier", ctypes.c_uint64 * 4)]


class _MapDumb(ctypes.Structure):  # struct drm_mode_map_dumb
    _fields_ = [("handle", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("offset", ctypes.c_uint64)]


class _GemClose(ctypes.Structure):  # struct drm_gem_close
    _fields_ = [("handle", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class _ClientCap(ctypes.Structure):  # struct drm_set_client_cap
    _fields_ = [("capability", ctypes.c_uint64), ("value", ctypes.c_uint64)]


class _PlaneRes(ctypes.Structure):  # struct drm_mode_get_plane_res
    _fields_ = [("plane_id_ptr", ctypes.c_uint64), ("count_planes", ctypes.c_uint32)]


class _Plane(ctypes.Structure):  # struct drm_mode_get_plane
    _fields_ = [("plane_id", ctypes.c_uint32), ("crtc_id", ctypes.c_uint32), ("fb_id", ctypes.c_uint32),
                ("possible_crtcs", ctypes.c_uint32), ("gamma_size", ctypes.c_uint32),
                ("count_format_types", ctypes.c_uint32), ("format_type_ptr", ctypes.c_uint64)]


class _ObjProps(ctypes.Structure):  # struct drm_mode_obj_get_properties
    _fields_ = [("props_ptr", ctypes.c_uint64), ("prop_values_ptr", ctypes.c_uint64),
                ("count_props", ctypes.c_uint32), ("obj_id", ctypes.c_uint32),
                ("obj_type", ctypes.c_uint32)]


class _Property(ctypes.Structure):  # struct drm_mode_get_property
    _fields_ = [("values_ptr", ctypes.c_uint64), ("enum_blob_ptr", ctypes.c_uint64),
                ("prop_id", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("name", ctypes.c_char * 32),
                ("count_values", ctypes.c_uint32), ("count_enum_blobs", ctypes.c_uint32)]


IOCTL_GEM_CLOSE = _iow(0x09, _GemClose)
IOCTL_DROP_MASTER = (_DRM << 8) | 0x1F  # _IO('d', 0x1f)
IOCTL_SET_CLIENT_CAP = _iow(0x0D, _ClientCap)
IOCTL_MODE_GETRESOURCES = _iowr(0xA0, _CardRes)
IOCTL_MODE_GETCRTC = _iowr(0xA1, _Crtc)
IOCTL_MODE_GETPROPERTY = _iowr(0xAA, _Property)
IOCTL_MODE_MAP_DUMB = _iowr(0xB3, _MapDumb)
IOCTL_MODE_GETPLANERESOURCES = _iowr(0xB5, _PlaneRes)
IOCTL_MODE_GETPLANE = _iowr(0xB6, _Plane)
IOCTL_MODE_OBJ_GETPROPERTIES = _iowr(0xB9, _ObjProps)
IOCTL_MODE_GETFB2 = _iowr(0xCE, _FbCmd2)

CLIENT_CAP_UNIVERSAL_PLANES = 2
PROPS_ROOM = 64
OBJECT_PLANE = 0xEEEEEEEE


def fourcc(code: str) -> int:
    a, b, c, d = (ord(ch) for ch in code)
    return a | b << 8 | c << 16 | d << 24


# Little-endian 32-bit pixels whose bytes are B, G, R, X (or A): the worker's frame layout as is.
FORMATS_BGRX = {fourcc("XR24"): "XRGB8888", fourcc("AR24"): "ARGB8888"}
MODIFIER_LINEAR = 0
MODIFIER_INVALID = (1 << 56) - 1
# The largest framebuffer mapped (16384x16384 XRGB): past that a plane is a corrupt answer.
MAX_MAP_BYTES = 1 << 30


class KmsError(OSError):
    """A DRM ioctl failed, or its answer cannot be used."""


@dataclass(frozen=True)
class Framebuffer:
    """What GETFB2 said of one framebuffer (its first plane: the formats read here have one)."""

    fb_id: int
    width: int
    height: int
    pixel_format: int
    pitch: int
    offset: int
    modifier: int
    handle: int  # 0 when the kernel gave none (not DRM master, no CAP_SYS_ADMIN)

    @property
    def format_name(self) -> str:
        return FORMATS_BGRX.get(self.pixel_format) or self.pixel_format.to_bytes(4, "little").decode(
            "ascii", "replace")


@dataclass(frozen=True)
class Crtc:
    crtc_id: int
    fb_id: int
    x: int
    y: int
    width: int  # the mode's, 0 when no mode is set
    height: int
    refresh: int  # Hz, 0 when unknown


@dataclass(frozen=True)
class Plane:
    plane_id: int
    crtc_id: int
    fb_id: int
    possible_crtcs: int  # a bit per CRTC, in GETRESOURCES' order
    kind: str  # "primary", "overlay", "cursor" (the plane's "type" property), "" if unknown
    crtc_x: int
    crtc_y: int
    hot_x: int = 0  # a cursor plane's hotspot, where the driver has the property (Linux 6.8+)
    hot_y: int = 0


def _ioctl(fd: int, request: int, arg: ctypes.Structure, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, arg, True)
    except OSError as exc:
        raise KmsError(exc.errno, f"{what}: {exc.strerror}") from None


def _ids(count: int) -> ctypes.Array:
    return (ctypes.c_uint32 * max(count, 1))()


class Card:
    """An open DRM device (a primary node, /dev/dri/cardN), read-only; closed with close()."""

    def __init__(self, path: str, fd: int | None = None) -> None:
        """Opens `path`, or uses `fd` (an open file of it, which the Card then owns)."""
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                raise KmsError(errno.ENODEV, f"{path} is not a character device")
            # Universal planes: the cursor plane and each plane's "type" become visible.
            _ioctl(fd, IOCTL_SET_CLIENT_CAP, _ClientCap(CLIENT_CAP_UNIVERSAL_PLANES, 1),
                   "SET_CLIENT_CAP(UNIVERSAL_PLANES)")
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self.fd = fd
        self._prop_names: dict[int, str] = {}

    def drop_master(self) -> bool:
        """Give up DRM master if opening made us master (nobody else was): a display server
        starting later must be able to become master. True if we were."""
        try:
            fcntl.ioctl(self.fd, IOCTL_DROP_MASTER, 0)
        except OSError:
            return False  # EINVAL: not master
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Card:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def crtcs(self) -> list[Crtc]:
        res = _CardRes()
        _ioctl(self.fd, IOCTL_MODE_GETRESOURCES, res, "GETRESOURCES")
        # The counts may grow between the two calls (a hotplugged connector): ask with room.
        ids = _ids(res.count_crtcs)
        res2 = _CardRes(crtc_id_ptr=ctypes.addressof(ids), count_crtcs=res.count_crtcs)
        _ioctl(self.fd, IOCTL_MODE_GETRESOURCES, res2, "GETRESOURCES")
        return [self.crtc(crtc_id) for crtc_id in ids[:min(res.count_crtcs, res2.count_crtcs)]]

    def crtc(self, crtc_id: int) -> Crtc:
        c = _Crtc(crtc_id=crtc_id)
        _ioctl(self.fd, IOCTL_MODE_GETCRTC, c, f"GETCRTC({crtc_id})")
        valid = bool(c.mode_valid)
        return Crtc(crtc_id, c.fb_id, c.x, c.y, c.mode.hdisplay if valid else 0,
                    c.mode.vdisplay if valid else 0, c.mode.vrefresh if valid else 0)

    def plane_ids(self) -> list[int]:
        res = _PlaneRes()
        _ioctl(self.fd, IOCTL_MODE_GETPLANERESOURCES, res, "GETPLANERESOURCES")
        ids = _ids(res.count_planes)
        res2 = _PlaneRes(plane_id_ptr=ctypes.addressof(ids), count_planes=res.count_planes)
        _ioctl(self.fd, IOCTL_MODE_GETPLANERESOURCES, res2, "GETPLANERESOURCES")
        return list(ids[:min(res.count_planes, res2.count_planes)])

    def planes(self) -> list[Plane]:
        return [self.plane(plane_id) for plane_id in self.plane_ids()]

    def plane(self, plane_id: int, props: bool = True) -> Plane:
        """A plane, with what its properties say: its kind, where on the CRTC, its hotspot
        (without `props` only its CRTC and framebuffer: one ioctl instead of two)."""
        pl = _Plane(plane_id=plane_id)
        _ioctl(self.fd, IOCTL_MODE_GETPLANE, pl, f"GETPLANE({plane_id})")
        if not props:
            return Plane(plane_id, pl.crtc_id, pl.fb_id, pl.possible_crtcs, "", 0, 0)
        props = self.properties(plane_id, OBJECT_PLANE)
        kind = {0: "overlay", 1: "primary", 2: "cursor"}.get(props.get("type", -1), "")
        return Plane(plane_id, pl.crtc_id, pl.fb_id, pl.possible_crtcs, kind,
                     _signed32(props.get("CRTC_X", 0)), _signed32(props.get("CRTC_Y", 0)),
                     _signed32(props.get("HOTSPOT_X", 0)), _signed32(props.get("HOTSPOT_Y", 0)))

    def properties(self, obj_id: int, obj_type: int) -> dict[str, int]:
        """An object's properties by name (their current values)."""
        # One ioctl with room for all of a plane's or CRTC's properties (a few dozen at most);
        # a second only for an object that has more. Each is a look's cost under TCG.
        count = PROPS_ROOM
        while True:
            ids, values = _ids(count), (ctypes.c_uint64 * max(count, 1))()
            q2 = _ObjProps(props_ptr=ctypes.addressof(ids),
                           prop_values_ptr=ctypes.addressof(values), count_props=count,
                           obj_id=obj_id, obj_type=obj_type)
            _ioctl(self.fd, IOCTL_MODE_OBJ_GETPROPERTIES, q2, f"OBJ_GETPROPERTIES({obj_id})")
            if q2.count_props <= count:
                count = q2.count_props
                break
            count = q2.count_props
        out = {}
        for prop_id, value in zip(ids[:min(count, q2.count_props)], values, strict=False):
            name = self._prop_names.get(prop_id)
            if name is None:  # a property's name never changes: asked once
                prop = _Property(prop_id=prop_id)
                _ioctl(self.fd, IOCTL_MODE_GETPROPERTY, prop, f"GETPROPERTY({prop_id})")
                name = self._prop_names[prop_id] = prop.name.decode("ascii", "replace")
            out[name] = value
        return out

    def framebuffer(self, fb_id: int, handle: bool = True) -> Framebuffer:
        """GETFB2: the framebuffer's layout, and with `handle` a handle (ours, to close) to its
        first buffer. The kernel gives handles only to DRM master and CAP_SYS_ADMIN; without
        `handle` any it gave are closed at once."""
        fb = _FbCmd2(fb_id=fb_id)
        _ioctl(self.fd, IOCTL_MODE_GETFB2, fb, f"GETFB2({fb_id})")
        keep = fb.handles[0] if handle else 0
        for h in set(fb.handles) - {0, keep}:
            self.close_handle(h)
        return Framebuffer(fb_id, fb.width, fb.height, fb.pixel_format, fb.pitches[0], fb.offsets[0],
                           fb.modifier[0], keep)

    def close_handle(self, handle: int) -> None:
        if handle:
            with contextlib.suppress(KmsError):
                _ioctl(self.fd, IOCTL_GEM_CLOSE, _GemClose(handle=handle), "GEM_CLOSE")

    def buffer_offset(self, handle: int, what: str = "") -> int:
        """The buffer's place in this device's mmap space (MAP_DUMB): fixed for the buffer's
        life and never another buffer's while a mapping of it exists, so it tells a buffer apart
        from a new one under the same framebuffer id."""
        if not handle:
            raise KmsError(errno.EPERM, f"no handle for {what or 'the buffer'} "
                                        "(the kernel gives one only to DRM master or CAP_SYS_ADMIN)")
        q = _MapDumb(handle=handle)
        _ioctl(self.fd, IOCTL_MODE_MAP_DUMB, q, f"MAP_DUMB({what or handle})")
        return q.offset

    def map(self, fb: Framebuffer, handle: int, offset: int | None = None) -> mmap.mmap:
        """A read-only mapping of the framebuffer's first buffer (`handle`, a handle to it in this
        open file, at `offset` if buffer_offset() said already), from the buffer's start to the
        framebuffer's last row."""
        length = fb.offset + fb.pitch * fb.height
        if fb.pitch < fb.width * 4 or not 0 < length <= MAX_MAP_BYTES:
            raise KmsError(errno.EINVAL, f"framebuffer {fb.fb_id}: pitch {fb.pitch} for width "
                                         f"{fb.width}, {length} bytes")
        if offset is None:
            offset = self.buffer_offset(handle, f"framebuffer {fb.fb_id}")
        try:
            return mmap.mmap(self.fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                             offset=offset)
        except (OSError, ValueError) as exc:
            raise KmsError(getattr(exc, "errno", None) or errno.EINVAL,
                           f"mmap of framebuffer {fb.fb_id}: {exc}") from None


def _signed32(value: int) -> int:
    """A plane's CRTC_X/CRTC_Y: signed 32-bit values the kernel hands out as u64."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def cards(root: str = "/dev/dri") -> list[str]:
    """The primary DRM nodes, cardN, in order."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = [n for n in names if n.startswith("card") and n[4:].isdigit()]
    return [os.path.join(root, n) for n in sorted(found, key=lambda n: int(n[4:]))]
