"""The service's error hierarchy and the named D-Bus error each one becomes at the bus boundary."""

from __future__ import annotations

from spice_stream_common.constants import ERROR_PREFIX


class ServiceError(Exception):
    """Base of every refusal the service reports to a caller; its text is for a person to act on."""

    dbus_name = ERROR_PREFIX + "Failed"


class PermissionDenied(ServiceError):
    dbus_name = ERROR_PREFIX + "PermissionDenied"


class InvalidArgument(ServiceError):
    dbus_name = ERROR_PREFIX + "InvalidArgument"


class NotInSession(ServiceError):
    dbus_name = ERROR_PREFIX + "NotInSession"


class LimitReached(ServiceError):
    dbus_name = ERROR_PREFIX + "LimitReached"


class AuthorityUnavailable(ServiceError):
    """polkit or logind did not answer in time: refuse rather than guess."""

    dbus_name = ERROR_PREFIX + "AuthorityUnavailable"


class StartFailed(ServiceError):
    """A process the service needs (the Xauthority reader) could not be started: the service's
    own failure (its sandbox, its limits), not the caller's; the D-Bus name stays Failed."""


class ConfigError(ServiceError):
    """A configuration value is refused at start: names the key, the value and what is allowed."""

    dbus_name = ERROR_PREFIX + "InvalidArgument"


# Every unexpected exception becomes this at the boundary (logged with its traceback once).
GENERIC_ERROR = ERROR_PREFIX + "Failed"
