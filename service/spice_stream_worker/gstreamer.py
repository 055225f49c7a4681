"""PyGObject and GStreamer, imported only when something needs them (a screen cast, a video
encoder), each missing piece named by its Debian package."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from typing import Any

from spice_stream_common.exitcodes import DisplayUnavailable

log = logging.getLogger(__name__)

# What each missing piece is called in Debian.
PACKAGE_GI = "python3-gi"
PACKAGE_GST = "gir1.2-gstreamer-1.0"
PACKAGE_GST_BASE_GIR = "gir1.2-gst-plugins-base-1.0"
# Where GStreamer's registry goes when the home cannot be written (the service's unit mounts it
# read-only): the private /tmp that the service's workers share, one directory per uid. Without
# one, GStreamer scans every plugin at each start and cannot keep what it found: about 1 s here,
# seconds under TCG, for each worker.
REGISTRY_PARENT = "/tmp"


class Media:
    """The PyGObject modules (GLib, Gio, Gst, GstVideo), imported at the first use, never before.
    DisplayUnavailable (`purpose` in its text) names the Debian package of the first piece
    missing: PyGObject, the introspection data, or one of `elements` ((element, package) pairs)."""

    def __init__(self, purpose: str, elements: Sequence[tuple[str, str]] = ()) -> None:
        try:
            import gi
        except ImportError:
            raise DisplayUnavailable(
                f"{purpose} needs PyGObject: install the Debian package {PACKAGE_GI}") from None
        place_registry()
        Gst = _typelib(gi, "Gst", f"{purpose} needs GStreamer's introspection data: install the "
                       f"Debian package {PACKAGE_GST}")
        GstVideo = _typelib(gi, "GstVideo", f"{purpose} needs GStreamer's video library data: "
                            f"install the Debian package {PACKAGE_GST_BASE_GIR}")
        from gi.repository import Gio, GLib

        Gst.init(None)
        for element, package in elements:
            if Gst.ElementFactory.find(element) is None:
                raise DisplayUnavailable(
                    f"{purpose} needs the GStreamer element {element}: install the Debian "
                    f"package {package}")
        self.GLib, self.Gio, self.Gst, self.GstVideo = GLib, Gio, Gst, GstVideo


def alias(Gst: Any, buffer: Any) -> Any:
    """A new buffer on `buffer`'s memory (not copied), its timestamps and flags its own to set.
    PyGObject's Buffer.copy() is GBoxed's, a second reference to the same buffer: setting a time
    on that would change the first one's too."""
    flags = Gst.BufferCopyFlags
    return buffer.copy_region(flags.FLAGS | flags.TIMESTAMPS | flags.META | flags.MEMORY,
                              0, buffer.get_size())


def _typelib(gi: object, name: str, missing: str) -> object:
    """gi.repository.<name> 1.0, or DisplayUnavailable(missing)."""
    import importlib

    try:
        gi.require_version(name, "1.0")  # type: ignore[attr-defined]
        return importlib.import_module(f"gi.repository.{name}")
    except (ValueError, ImportError):
        raise DisplayUnavailable(missing) from None


def place_registry(parent: str = REGISTRY_PARENT) -> str | None:
    """Point GStreamer's registry (GST_REGISTRY_1_0) at a directory of this uid's own in `parent`
    when the user's cache directory cannot be written; the file it names, or None when left as it
    was. The directory is used only if it is this uid's, not a symlink, and closed to others (in
    a shared, sticky /tmp another user may have made that name first: then the registry stays in
    memory only, and a line says why)."""
    if "GST_REGISTRY_1_0" in os.environ or "GST_REGISTRY" in os.environ:
        return None
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.environ.get("HOME", "/"), ".cache")
    probe = cache if os.path.isdir(cache) else os.path.dirname(cache.rstrip("/")) or "/"
    if os.access(probe, os.W_OK):
        return None  # GStreamer's own place works
    uid = os.getuid()
    name = os.path.join(parent, f"spice-stream-worker-{uid}")
    try:
        try:
            os.mkdir(name, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(name)
    except OSError as exc:
        log.info("GStreamer's registry is not kept (%s: %s)", name, exc.strerror)
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        log.warning("GStreamer's registry is not kept: %s is not this user's own directory", name)
        return None
    path = os.path.join(name, "registry.bin")
    os.environ["GST_REGISTRY_1_0"] = path
    return path
