"""The scanout reader's target from the `scanout` setting: its device and its system user, never
root's ids, and one log line whenever the display itself will not be streamed."""

from __future__ import annotations

import logging
import os
import pwd

import pytest

from spice_streamd.scanouttarget import scanout_target


def a_user() -> pwd.struct_passwd:
    """A user of this machine that is not root (its name stands in for spice-streamd)."""
    for entry in pwd.getpwall():
        if entry.pw_uid != 0 and entry.pw_gid != 0:
            return entry
    pytest.skip("no user besides root here")


def test_off_and_no_device_and_no_user_mean_no_scanout(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        assert scanout_target("off") is None
        assert scanout_target("auto", dri_root=str(tmp_path)) is None  # no cardN there
        assert scanout_target("/dev/dri/card0", user="no-such-user-here") is None
    text = caplog.text
    assert "scanout off (configuration)" in text
    assert f"no DRM device in {tmp_path}" in text
    assert "no system user no-such-user-here" in text


def test_root_is_never_the_reader(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert scanout_target("/dev/dri/card0", user="root") is None
    assert "never runs with root's ids" in caplog.text


def test_a_configured_device_and_the_system_user(caplog) -> None:
    user = a_user()
    target = scanout_target("/dev/dri/card1", user=user.pw_name)
    assert target is not None and target.scanout and target.card == "/dev/dri/card1"
    assert (target.uid, target.gid, target.groups) == (user.pw_uid, user.pw_gid, ())
    assert target.label == "scanout" and not target.wayland


def test_auto_takes_the_first_card_when_none_can_be_asked(tmp_path) -> None:
    """No card answers (these are not devices): the first by number is taken, the display may be
    off just now."""
    for name in ("card10", "card2", "renderD128"):
        (tmp_path / name).write_text("")
    target = scanout_target("auto", user=a_user().pw_name, dri_root=str(tmp_path))
    assert target is not None and target.card == os.path.join(tmp_path, "card2")
