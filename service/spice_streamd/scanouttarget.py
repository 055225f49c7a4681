"""The scanout reader's target: which DRM device it reads and which unprivileged system user it
runs as, decided once at start from the `scanout` setting; None when the scanout is not used."""

from __future__ import annotations

import logging
import pwd

from spice_stream_common.constants import SCANOUT_USER

from .framebuffers import find_card
from .workerprocess import WorkerTarget

log = logging.getLogger(__name__)


def scanout_target(setting: str, *, user: str = SCANOUT_USER,
                   dri_root: str = "/dev/dri") -> WorkerTarget | None:
    """The target for `setting` ("auto", "off" or a device path), or None with one log line
    saying why the display itself will not be streamed."""
    if setting == "off":
        log.info("scanout off (configuration): only registered sessions are streamed")
        return None
    card = find_card(dri_root) if setting == "auto" else setting
    if not card:
        log.info("scanout: no DRM device in %s: only registered sessions are streamed", dri_root)
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        log.warning("scanout: no system user %s (installed by the package's sysusers.d file): "
                    "only registered sessions are streamed", user)
        return None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        log.warning("scanout: user %s is uid %d gid %d: a reader never runs with root's ids; "
                    "only registered sessions are streamed", user, entry.pw_uid, entry.pw_gid)
        return None
    log.info("scanout: %s, read as %s (uid %d), when no registered session is in front",
             card, user, entry.pw_uid)
    return WorkerTarget(uid=entry.pw_uid, gid=entry.pw_gid, groups=(), display="", xauthority="",
                        vt=0, kind="scanout", card=card)
