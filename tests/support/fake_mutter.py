"""A stand-in for what gnome-shell serves on the session bus for a screen cast, the only stand-in of the
screencast tests (the bus, PipeWire, the nodes and the pipelines are real).

Run as a process (`python -m tests.support.fake_mutter ADDRESS`): it owns org.gnome.Mutter.ScreenCast
(API version 4: CreateSession, RecordMonitor, Start, Stop, Closed, PipeWireStreamAdded),
org.gnome.ScreenSaver (GetActive, ActiveChanged) and org.gnome.Mutter.DisplayConfig (MonitorsChanged),
one connection for all three as in gnome-shell, and behaves as mutter does where the source depends on
it: later calls only from the connection that created the session, the session ends with that
connection, every session closed on the lock screen and new ones refused while locked. Start emits
PipeWireStreamAdded with the node id set by the test (a real node in a real PipeWire daemon).

The test drives it on a control interface (FakeMutter, the Python side below): SetNode, Lock, Unlock,
StopButton (what the indicator's Stop does: Closed, nothing else), ChangeMonitors (MonitorsChanged then
Closed), FailCreate, Counts. Restarting mutter is ending this process and starting another.
"""

from __future__ import annotations

import os
import subprocess
import sys

CONTROL = "org.spice_space.Test.FakeMutter"
CONTROL_PATH = "/org/spice_space/Test/FakeMutter"

XML = """
<node>
  <interface name="org.gnome.Mutter.ScreenCast">
    <method name="CreateSession">
      <arg name="properties" type="a{sv}" direction="in"/>
      <arg name="session_path" type="o" direction="out"/>
    </method>
    <property name="Version" type="i" access="read"/>
  </interface>
  <interface name="org.gnome.Mutter.ScreenCast.Session">
    <method name="Start"/>
    <method name="Stop"/>
    <signal name="Closed"/>
    <method name="RecordMonitor">
      <arg name="connector" type="s" direction="in"/>
      <arg name="properties" type="a{sv}" direction="in"/>
      <arg name="stream_path" type="o" direction="out"/>
    </method>
  </interface>
  <interface name="org.gnome.Mutter.ScreenCast.Stream">
    <signal name="PipeWireStreamAdded"><arg name="node_id" type="u"/></signal>
  </interface>
  <interface name="org.gnome.ScreenSaver">
    <method name="GetActive"><arg type="b" direction="out"/></method>
    <signal name="ActiveChanged"><arg type="b"/></signal>
  </interface>
  <interface name="org.gnome.Mutter.DisplayConfig">
    <signal name="MonitorsChanged"/>
  </interface>
  <interface name="org.spice_space.Test.FakeMutter">
    <method name="SetNode"><arg type="u" direction="in"/></method>
    <method name="Lock"/>
    <method name="Unlock"/>
    <method name="StopButton"/>
    <method name="ChangeMonitors"/>
    <method name="FailCreate"><arg type="u" direction="in"/></method>
    <method name="Counts"><arg type="a{su}" direction="out"/></method>
    <method name="LastCursorMode"><arg type="u" direction="out"/></method>
    <method name="Sessions"><arg type="u" direction="out"/></method>
  </interface>
</node>
"""


def serve(address: str) -> None:
    import gi

    gi.require_version("Gio", "2.0")
    from gi.repository import Gio, GLib

    info = Gio.DBusNodeInfo.new_for_xml(XML)
    iface = {i.name: i for i in info.interfaces}
    conn = Gio.DBusConnection.new_for_address_sync(
        address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
    state = {"node": 0, "locked": False, "fail": 0, "next": 0, "cursor": 99}
    counts = {"CreateSession": 0, "RecordMonitor": 0, "Start": 0, "Stop": 0, "Closed": 0}
    sessions: dict[str, dict] = {}  # path -> {owner, regs, stream}

    def emit(path, interface, name, params=None):
        conn.emit_signal(None, path, interface, name, params)

    def close_session(path, signal=True):
        s = sessions.pop(path, None)
        if s is None:
            return
        for reg in s["regs"]:
            conn.unregister_object(reg)
        if signal:
            counts["Closed"] += 1
            emit(path, "org.gnome.Mutter.ScreenCast.Session", "Closed")

    def close_all():
        for path in list(sessions):
            close_session(path)

    def on_owner_changed(_c, _s, _p, _i, _n, params, *_):
        name, _old, new = params.unpack()
        if new:
            return
        for path, s in list(sessions.items()):
            if s["owner"] == name:
                close_session(path, signal=False)  # ends with its creator's connection

    conn.signal_subscribe("org.freedesktop.DBus", "org.freedesktop.DBus", "NameOwnerChanged",
                          "/org/freedesktop/DBus", None, Gio.DBusSignalFlags.NONE, on_owner_changed)

    def session_call(_c, sender, path, interface, method, params, invocation, *_):
        s = sessions.get(path)
        if s is None:
            invocation.return_dbus_error("org.freedesktop.DBus.Error.UnknownObject", "no session")
            return
        if sender != s["owner"]:
            invocation.return_dbus_error("org.freedesktop.DBus.Error.AccessDenied",
                                         "Permission denied")
            return
        counts[method] = counts.get(method, 0) + 1
        if method == "RecordMonitor":
            connector, props = params.unpack()
            state["cursor"] = props.get("cursor-mode", 0)
            stream = path.replace("/Session/", "/Stream/")
            s["regs"].append(conn.register_object(
                stream, iface["org.gnome.Mutter.ScreenCast.Stream"], None, None, None))
            s["stream"] = stream
            invocation.return_value(GLib.Variant("(o)", (stream,)))
        elif method == "Start":
            invocation.return_value(None)
            stream, node = s.get("stream"), state["node"]
            if stream:
                GLib.idle_add(lambda: emit(stream, "org.gnome.Mutter.ScreenCast.Stream",
                                           "PipeWireStreamAdded", GLib.Variant("(u)", (node,)))
                              and False)
        elif method == "Stop":
            invocation.return_value(None)
            close_session(path)
        else:
            invocation.return_dbus_error("org.freedesktop.DBus.Error.UnknownMethod", method)

    def mutter_call(_c, sender, path, interface, method, params, invocation, *_):
        if method != "CreateSession":
            invocation.return_dbus_error("org.freedesktop.DBus.Error.UnknownMethod", method)
            return
        counts["CreateSession"] += 1
        if state["locked"]:
            invocation.return_dbus_error("org.freedesktop.DBus.Error.Failed",
                                         "Session creation inhibited")
            return
        if state["fail"]:
            state["fail"] -= 1
            invocation.return_dbus_error("org.freedesktop.DBus.Error.Failed", "Failed to create")
            return
        state["next"] += 1
        path = f"/org/gnome/Mutter/ScreenCast/Session/u{state['next']}"
        reg = conn.register_object(path, iface["org.gnome.Mutter.ScreenCast.Session"],
                                   session_call, None, None)
        sessions[path] = {"owner": sender, "regs": [reg]}
        invocation.return_value(GLib.Variant("(o)", (path,)))

    def mutter_get(*args):
        return GLib.Variant("i", 4)

    def saver_call(_c, sender, path, interface, method, params, invocation, *_):
        invocation.return_value(GLib.Variant("(b)", (state["locked"],)))

    def control_call(_c, sender, path, interface, method, params, invocation, *_):
        if method == "SetNode":
            state["node"] = params.unpack()[0]
        elif method == "Lock":
            # gnome-shell: the session mode forbids screencasts (sessions closed, new ones
            # refused), then the shield is up and ActiveChanged(true).
            state["locked"] = True
            close_all()
            emit("/org/gnome/ScreenSaver", "org.gnome.ScreenSaver", "ActiveChanged",
                 GLib.Variant("(b)", (True,)))
        elif method == "Unlock":
            state["locked"] = False
            emit("/org/gnome/ScreenSaver", "org.gnome.ScreenSaver", "ActiveChanged",
                 GLib.Variant("(b)", (False,)))
        elif method == "StopButton":
            close_all()
        elif method == "ChangeMonitors":
            emit("/org/gnome/Mutter/DisplayConfig", "org.gnome.Mutter.DisplayConfig",
                 "MonitorsChanged")
            close_all()
        elif method == "FailCreate":
            state["fail"] = params.unpack()[0]
        elif method == "Counts":
            invocation.return_value(GLib.Variant("(a{su})", (counts,)))
            return
        elif method == "LastCursorMode":
            invocation.return_value(GLib.Variant("(u)", (state["cursor"],)))
            return
        elif method == "Sessions":
            invocation.return_value(GLib.Variant("(u)", (len(sessions),)))
            return
        invocation.return_value(None)

    conn.register_object("/org/gnome/Mutter/ScreenCast", iface["org.gnome.Mutter.ScreenCast"],
                         mutter_call, mutter_get, None)
    conn.register_object("/org/gnome/ScreenSaver", iface["org.gnome.ScreenSaver"], saver_call,
                         None, None)
    conn.register_object("/org/gnome/Mutter/DisplayConfig",
                         iface["org.gnome.Mutter.DisplayConfig"], None, None, None)
    conn.register_object(CONTROL_PATH, iface[CONTROL], control_call, None, None)
    for name in ("org.gnome.Mutter.DisplayConfig", "org.gnome.ScreenSaver", CONTROL,
                 "org.gnome.Mutter.ScreenCast"):  # the one the source waits for, last
        reply = conn.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus",
                               "org.freedesktop.DBus", "RequestName",
                               GLib.Variant("(su)", (name, 4)), None, 0, -1, None)
        assert reply.unpack()[0] == 1, name
    print("ready", flush=True)
    GLib.MainLoop().run()


class FakeMutter:
    """The fake as a child process, and a synchronous client of its control interface."""

    def __init__(self, address: str, node: int = 0, env: dict[str, str] | None = None) -> None:
        from gi.repository import Gio

        self.address = address
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_mutter", address],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env or dict(os.environ),
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError("the fake mutter did not start")
        self.conn = Gio.DBusConnection.new_for_address_sync(
            address, Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
            | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None)
        if node:
            self.set_node(node)

    def _call(self, method: str, signature: str | None = None, *args):
        from gi.repository import GLib

        params = GLib.Variant(signature, args) if signature else None
        reply = self.conn.call_sync(CONTROL, CONTROL_PATH, CONTROL, method, params, None, 0,
                                    5000, None)
        return reply.unpack() if reply is not None else ()

    def set_node(self, node: int) -> None:
        self._call("SetNode", "(u)", node)

    def lock(self) -> None:
        self._call("Lock")

    def unlock(self) -> None:
        self._call("Unlock")

    def stop_button(self) -> None:
        self._call("StopButton")

    def change_monitors(self) -> None:
        self._call("ChangeMonitors")

    def fail_create(self, n: int) -> None:
        self._call("FailCreate", "(u)", n)

    def counts(self) -> dict[str, int]:
        return dict(self._call("Counts")[0])

    def cursor_mode(self) -> int:
        return self._call("LastCursorMode")[0]

    def sessions(self) -> int:
        return self._call("Sessions")[0]

    def stop(self) -> None:
        from .waiting import stop_process

        conn, self.conn = getattr(self, "conn", None), None
        if conn is not None:
            conn.close_sync(None)
        stop_process(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> FakeMutter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    serve(sys.argv[1])
