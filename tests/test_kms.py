"""The DRM/KMS ioctl layer (spice_stream_common/kms.py): request numbers, structs, Card's checks, cards()."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from spice_stream_common import kms

# The kernel's numbers (include/uapi/drm/drm.h), as `strace -e raw=ioctl` shows them.
KERNEL_IOCTLS = {
    "IOCTL_MODE_GETFB2": 0xC06864CE,
    "IOCTL_MODE_GETCRTC": 0xC06864A1,
    "IOCTL_MODE_GETRESOURCES": 0xC04064A0,
    "IOCTL_MODE_MAP_DUMB": 0xC01064B3,
    "IOCTL_MODE_GETPLANE": 0xC02064B6,
    "IOCTL_MODE_OBJ_GETPROPERTIES": 0xC02064B9,
    "IOCTL_MODE_GETPROPERTY": 0xC04064AA,
    "IOCTL_MODE_GETPLANERESOURCES": 0xC01064B5,
    "IOCTL_SET_CLIENT_CAP": 0x4010640D,
    "IOCTL_GEM_CLOSE": 0x40086409,
    "IOCTL_DROP_MASTER": 0x641F,
}


@pytest.mark.parametrize("name", sorted(KERNEL_IOCTLS))
def test_ioctl_numbers_are_the_kernels(name):
    assert getattr(kms, name) == KERNEL_IOCTLS[name], f"{name} = {getattr(kms, name):#x}"


def test_struct_sizes_are_the_kernels():
    # sizeof in the uapi headers (x86_64 and every other Linux ABI: only fixed-size fields).
    assert ctypes.sizeof(kms._ModeInfo) == 68
    assert ctypes.sizeof(kms._Crtc) == 104
    assert ctypes.sizeof(kms._FbCmd2) == 104
    assert ctypes.sizeof(kms._CardRes) == 64
    assert ctypes.sizeof(kms._Plane) == 32


# Field offsets in the uapi structs (drm_mode.h): a field dropped or swapped before a 64-bit one
# can keep the size (padding) and the ioctl number, not these.
KERNEL_OFFSETS = [
    ("_Crtc", "fb_id", 16), ("_Crtc", "x", 20), ("_Crtc", "y", 24), ("_Crtc", "mode_valid", 32),
    ("_Crtc", "mode", 36),
    ("_ModeInfo", "hdisplay", 4), ("_ModeInfo", "vdisplay", 14), ("_ModeInfo", "vrefresh", 24),
    ("_FbCmd2", "pixel_format", 12), ("_FbCmd2", "handles", 20), ("_FbCmd2", "pitches", 36),
    ("_FbCmd2", "offsets", 52), ("_FbCmd2", "modifier", 72),
    ("_CardRes", "count_crtcs", 36),
    ("_Plane", "crtc_id", 4), ("_Plane", "fb_id", 8), ("_Plane", "possible_crtcs", 12),
    ("_ObjProps", "count_props", 16), ("_ObjProps", "obj_id", 20), ("_ObjProps", "obj_type", 24),
    ("_Property", "prop_id", 16), ("_Property", "name", 24), ("_Property", "count_values", 56),
    ("_MapDumb", "offset", 8),
]


@pytest.mark.parametrize(("struct", "field", "offset"), KERNEL_OFFSETS)
def test_field_offsets_are_the_kernels(struct, field, offset):
    assert getattr(getattr(kms, struct), field).offset == offset


def test_fourcc():
    assert kms.fourcc("XR24") == 0x34325258
    assert kms.fourcc("AR24") == 0x34325241
    assert set(kms.FORMATS_BGRX) == {kms.fourcc("XR24"), kms.fourcc("AR24")}


def test_format_name():
    fb = kms.Framebuffer(1, 8, 8, kms.fourcc("NV12"), 32, 0, 0, 0)
    assert fb.format_name == "NV12"
    assert kms.Framebuffer(1, 8, 8, kms.fourcc("XR24"), 32, 0, 0, 0).format_name == "XRGB8888"


@pytest.mark.parametrize(("raw", "value"), [
    (0, 0), (5, 5), (0x7FFFFFFF, 0x7FFFFFFF), (0x80000000, -(1 << 31)), (0xFFFFFFFF, -1),
    (0xFFFFFFF6, -10),
    (0xFFFFFFFFFFFFFFF0, -16),  # a negative CRTC_X as the kernel hands it: sign-extended u64
    (0x1_0000_0020, 32),
])
def test_signed32(raw, value):
    assert kms._signed32(raw) == value


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_card_refuses_a_regular_file_and_closes_it(tmp_path):
    path = tmp_path / "card0"
    path.write_bytes(b"")
    before = _open_fds()
    with pytest.raises(kms.KmsError) as info:
        kms.Card(str(path))
    assert info.value.errno == errno.ENODEV
    assert _open_fds() == before


def test_card_on_a_char_device_that_is_not_drm_closes_its_file():
    before = _open_fds()
    with pytest.raises(kms.KmsError) as info:
        kms.Card("/dev/null")  # a character device: SET_CLIENT_CAP is what fails
    assert info.value.errno == errno.ENOTTY
    assert "SET_CLIENT_CAP" in str(info.value)
    assert _open_fds() == before


def test_card_owns_a_given_fd_even_when_it_fails():
    fd = os.open("/dev/null", os.O_RDONLY)
    with pytest.raises(kms.KmsError):
        kms.Card("given", fd=fd)
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF


def _unopened_card() -> kms.Card:
    """A Card whose fd is not open: any ioctl reached fails with EBADF."""
    card = kms.Card.__new__(kms.Card)
    card.path, card.fd, card._prop_names = "none", 99999, {}
    return card


def _fb(**kw) -> kms.Framebuffer:
    args = dict(fb_id=7, width=64, height=48, pixel_format=kms.fourcc("XR24"), pitch=256, offset=0,
                modifier=0, handle=0)
    args.update(kw)
    return kms.Framebuffer(**args)


def test_map_refuses_no_handle_before_any_ioctl():
    with pytest.raises(kms.KmsError) as info:
        _unopened_card().map(_fb(), 0)
    assert info.value.errno == errno.EPERM


@pytest.mark.parametrize("fb", [
    _fb(pitch=64 * 4 - 4),  # a row would run into the next
    _fb(height=0),  # nothing to map
    _fb(width=16384, pitch=16384 * 4, height=16385),  # past MAX_MAP_BYTES
], ids=["short-pitch", "empty", "huge"])
def test_map_refuses_a_bad_layout_before_any_ioctl(fb):
    with pytest.raises(kms.KmsError) as info:
        _unopened_card().map(fb, 3)
    assert info.value.errno == errno.EINVAL


def test_map_with_a_good_layout_reaches_the_ioctl():
    # The counterpart of the two above: their errnos are the checks', not the ioctl's EBADF.
    with pytest.raises(kms.KmsError) as info:
        _unopened_card().map(_fb(), 3)
    assert info.value.errno == errno.EBADF
    assert "MAP_DUMB" in str(info.value)


class FakeIoctl:
    """fcntl.ioctl for a Card whose fd is never used: answers GETCRTC, GETFB2, GEM_CLOSE,
    OBJ_GETPROPERTIES and GETPROPERTY from tables, filling the structs as the kernel does."""

    def __init__(self):
        self.calls: list[int] = []
        self.closed: list[int] = []
        self.crtc = dict(fb_id=5, x=0, y=0, mode_valid=1, hdisplay=1024, vdisplay=768, vrefresh=60)
        self.fb_handles = [0, 0, 0, 0]
        self.props = {}  # prop_id: (name, value)

    def __call__(self, fd, request, arg, mutate=True):
        self.calls.append(request)
        if request == kms.IOCTL_MODE_GETCRTC:
            c = self.crtc
            arg.fb_id, arg.x, arg.y, arg.mode_valid = c["fb_id"], c["x"], c["y"], c["mode_valid"]
            arg.mode.hdisplay, arg.mode.vdisplay = c["hdisplay"], c["vdisplay"]
            arg.mode.vrefresh = c["vrefresh"]
        elif request == kms.IOCTL_MODE_GETFB2:
            arg.width, arg.height, arg.pixel_format = 64, 48, kms.fourcc("XR24")
            arg.pitches[0], arg.offsets[0] = 256, 0
            for i, h in enumerate(self.fb_handles):
                arg.handles[i] = h
        elif request == kms.IOCTL_GEM_CLOSE:
            self.closed.append(arg.handle)
        elif request == kms.IOCTL_MODE_OBJ_GETPROPERTIES:
            ids = sorted(self.props)
            if arg.count_props >= len(ids) and arg.props_ptr:
                out_ids = (ctypes.c_uint32 * len(ids)).from_address(arg.props_ptr)
                out_values = (ctypes.c_uint64 * len(ids)).from_address(arg.prop_values_ptr)
                for i, prop_id in enumerate(ids):
                    out_ids[i], out_values[i] = prop_id, self.props[prop_id][1]
            arg.count_props = len(ids)
        elif request == kms.IOCTL_MODE_GETPROPERTY:
            arg.name = self.props[arg.prop_id][0].encode()
        elif request == kms.IOCTL_MODE_GETPLANE:
            arg.crtc_id, arg.fb_id, arg.possible_crtcs = 31, 9, 1
        else:
            raise OSError(errno.ENOTTY, "not faked")
        return 0


@pytest.fixture
def faked(monkeypatch):
    fake = FakeIoctl()
    monkeypatch.setattr(kms.fcntl, "ioctl", fake)
    card = _unopened_card()
    return card, fake


def test_crtc(faked):
    card, fake = faked
    assert card.crtc(31) == kms.Crtc(31, 5, 0, 0, 1024, 768, 60)
    fake.crtc["mode_valid"] = 0  # a stale mode in the struct is not read as the size
    assert card.crtc(31) == kms.Crtc(31, 5, 0, 0, 0, 0, 0)


def test_framebuffer_keeps_only_the_handle_asked_for(faked):
    card, fake = faked
    fake.fb_handles = [11, 12, 11, 0]
    fb = card.framebuffer(5)
    assert (fb.handle, fb.width, fb.height, fb.pitch) == (11, 64, 48, 256)
    assert fake.closed == [12]
    fake.closed.clear()
    fb = card.framebuffer(5, handle=False)
    assert fb.handle == 0
    assert sorted(fake.closed) == [11, 12]


def test_plane_reads_its_properties_and_asks_their_names_once(faked):
    card, fake = faked
    fake.props = {1: ("type", 2), 2: ("CRTC_X", 0xFFFFFFFFFFFFFFFB), 3: ("CRTC_Y", 40),
                  4: ("HOTSPOT_X", 3), 5: ("HOTSPOT_Y", 4), 6: ("zpos", 9)}
    plane = card.plane(40)
    assert plane == kms.Plane(40, 31, 9, 1, "cursor", -5, 40, 3, 4)
    names_asked = fake.calls.count(kms.IOCTL_MODE_GETPROPERTY)
    assert names_asked == 6
    fake.props[3] = ("CRTC_Y", 41)
    assert card.plane(40).crtc_y == 41
    assert fake.calls.count(kms.IOCTL_MODE_GETPROPERTY) == names_asked


def test_close_handle_ignores_zero_and_errors(faked, monkeypatch):
    card, fake = faked
    card.close_handle(0)
    assert kms.IOCTL_GEM_CLOSE not in fake.calls
    card.close_handle(4)
    assert fake.closed == [4]
    def failing(*args):
        raise OSError(errno.EBADF, "bad")

    monkeypatch.setattr(kms.fcntl, "ioctl", failing)
    card.close_handle(4)  # no exception: a handle that cannot be closed is the kernel's business


def test_cards_lists_primary_nodes_in_numeric_order(tmp_path):
    for name in ("card10", "card0", "renderD128", "card2", "cardX", "card", "controlD64"):
        (tmp_path / name).write_bytes(b"")
    assert kms.cards(str(tmp_path)) == [str(tmp_path / n) for n in ("card0", "card2", "card10")]


def test_cards_without_the_directory(tmp_path):
    assert kms.cards(str(tmp_path / "absent")) == []
