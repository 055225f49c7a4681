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


def _typelib(gi: object, name: str, missing: str) -> object:
    """gi.repository.<name> 1.0, or DisplayUnavailable(missing)."""
    import importlib

    try:
        gi.require_version(name, "1.0")  # type: ignore[attr-defined]
        return importlib.import_module(f"gi.repository.{name}")
    except (ValueError, ImportError):
        raise DisplayUnavailable(missing) from None
