"""Every D-Bus name, object path, error name and polkit action id the service uses, in one place."""

from __future__ import annotations

# The release, as pyproject.toml says (tests/test_contract.py checks they agree).
VERSION = "0.1.0"

BUS_NAME = "org.spice_space.StreamingAgent1"
OBJECT_PATH = "/org/spice_space/StreamingAgent1"
INTERFACE = "org.spice_space.StreamingAgent1"
ERROR_PREFIX = INTERFACE + ".Error."

# One polkit action per exported method: deny by default, name the action.
ACTION_REGISTER_SESSION = "org.spice_space.streaming-agent.register-session"
METHOD_ACTIONS = {
    "RegisterSession": ACTION_REGISTER_SESSION,
    # The same action: registering a Wayland session gives the port to the same user at the same
    # seat as registering an X11 one.
    "RegisterWaylandSession": ACTION_REGISTER_SESSION,
}

DEFAULT_DEVICE = "/dev/virtio-ports/org.spice-space.stream.0"
STREAM_PORT_NAME = "org.spice-space.stream.0"

# System file names (issue #3 contract).
POLICY_FILE = BUS_NAME + ".conf"
ACTIVATION_FILE = BUS_NAME + ".service"
INTROSPECTION_FILE = BUS_NAME + ".xml"
SYSTEMD_UNIT = "spice-streamd.service"
POLKIT_FILE = "org.spice_space.streaming-agent.policy"

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
POLKIT_TIMEOUT_S = 25.0

LOGIND_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"
LOGIND_SESSION = "org.freedesktop.login1.Session"
LOGIND_SEAT = "org.freedesktop.login1.Seat"
LOGIND_USER = "org.freedesktop.login1.User"
LOGIND_SEAT0_PATH = "/org/freedesktop/login1/seat/seat0"
LOGIND_TIMEOUT_S = 5.0

# The system user the scanout reader runs as (the package's sysusers.d file creates it): not root,
# not a session's user, nobody else's processes.
SCANOUT_USER = "spice-streamd"
SYSUSERS_FILE = "spice-streamd.conf"
