"""PyGObject and GStreamer, imported only when something needs them (a screen cast, a video
encoder), each missing piece named by its Debian package."""

from __future__ import annotations

from collections.abc import Sequence

from spice_stream_common.exitcodes import DisplayUnavailable

# What each missing piece is called in Debian.
PACKAGE_GI = "python3-gi"
PACKAGE_GST = "gir1.2-gstreamer-1.0"
PACKAGE_GST_BASE_GIR = "gir1.2-gst-plugins-base-1.0"


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
        try:
            gi.require_version("Gst", "1.0")
            from gi.repository import Gst
        except (ValueError, ImportError):
            raise DisplayUnavailable(
                f"{purpose} needs GStreamer's introspection data: install the Debian package "
                f"{PACKAGE_GST}") from None
        try:
            gi.require_version("GstVideo", "1.0")
            from gi.repository import GstVideo
        except (ValueError, ImportError):
            raise DisplayUnavailable(
                f"{purpose} needs GStreamer's video library data: install the Debian package "
                f"{PACKAGE_GST_BASE_GIR}") from None
        from gi.repository import Gio, GLib

        Gst.init(None)
        for element, package in elements:
            if Gst.ElementFactory.find(element) is None:
                raise DisplayUnavailable(
                    f"{purpose} needs the GStreamer element {element}: install the Debian "
                    f"package {package}")
        self.GLib, self.Gio, self.Gst, self.GstVideo = GLib, Gio, Gst, GstVideo
