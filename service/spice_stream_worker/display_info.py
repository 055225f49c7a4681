"""Finds the graphics device behind the display, for DEVICE_DISPLAY_INFO (the host maps it to a monitor)."""

from __future__ import annotations

import glob
import logging
import os
import re

log = logging.getLogger(__name__)

_PCI_COMPONENT = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")


def pci_address(device_dir: str) -> str | None:
    """The SPICE address form of a PCI device: pci/DOMAIN/SLOT.FN for each bridge down to the device."""
    real = os.path.realpath(device_dir)
    parts = [p for p in real.split("/") if _PCI_COMPONENT.match(p)]
    if not parts:
        return None
    domain = _PCI_COMPONENT.match(parts[0]).group(1)  # type: ignore[union-attr]
    hops = []
    for part in parts:
        m = _PCI_COMPONENT.match(part)
        assert m is not None
        hops.append(f"{m.group(3)}.{m.group(4)}")
    return "pci/" + domain + "/" + "/".join(hops)


def find_display_device(sysfs: str = "/sys/class/drm") -> str | None:
    """The address of the only graphics card, or None when there is none or several (ambiguous)."""
    cards = sorted(glob.glob(os.path.join(sysfs, "card[0-9]*")))
    cards = [c for c in cards if re.fullmatch(r"card\d+", os.path.basename(c))]
    addresses = {a for a in (pci_address(os.path.join(c, "device")) for c in cards) if a}
    if len(addresses) != 1:
        log.debug("no single graphics device found (%d candidates): no DEVICE_DISPLAY_INFO", len(addresses))
        return None
    return addresses.pop()
