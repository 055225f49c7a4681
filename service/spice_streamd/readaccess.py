"""Who may read which property: root every one, anyone else the public ones and only their own
session's and worker's details."""

from __future__ import annotations

from typing import Any, NamedTuple

# Root (an administrator) reads every property. Anyone else reads the public ones (what explains
# "why is nothing streamed": ActiveVT, DevicePresent, WorkerState, Streaming, StreamingVT) and, of
# the others, only what is theirs: their own Sessions entries, and WorkerPID, WorkerStats (its rate
# is another user's typing rhythm) and LastError only of their own worker. PropertiesChanged is a
# broadcast every local user can receive: the per-user properties are only named in it
# (invalidated), never given; a reader then asks with Get, which knows who asks.
ROOT_UID = 0
PER_USER = ("Sessions", "WorkerPID", "LastError")
NO_STATS = {"frames": 0, "bytes": 0, "fps": 0.0, "restarts": 0}


class Owners(NamedTuple):
    """Whose the worker's details are: uids, -1 for none."""

    worker: int  # the relayed worker's (WorkerPID, WorkerStats)
    target: int  # the session the worker is for (LastError: why it does not run)


NOBODY = Owners(-1, -1)


def owners_of(supervisor: Any) -> Owners:
    """The WorkerSupervisor's owners: during a switch the old worker is still relayed while the
    target (and its LastError) is already the next session's."""
    return Owners(worker=int(supervisor.worker_uid), target=int(supervisor.status.get("uid", -1)))


def visible_to(values: dict[str, Any], uid: int | None, owners: Owners) -> dict[str, Any]:
    """The properties as the caller `uid` may read them (None: a caller nobody identified)."""
    if uid == ROOT_UID:
        return values
    shown_values = dict(values)
    shown_values["Sessions"] = [s for s in values.get("Sessions", []) if s[1] == uid]
    if uid is None or owners.worker != uid:
        shown_values["WorkerPID"] = 0
        shown_values["WorkerStats"] = dict(NO_STATS)
    if uid is None or owners.target != uid:
        shown_values["LastError"] = ""
    return shown_values
