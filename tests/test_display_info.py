"""DEVICE_DISPLAY_INFO's device address, from a sysfs-shaped tree."""

from __future__ import annotations

import os

from spice_stream_worker.display_info import find_display_device, pci_address


def make_card(root, name: str, pci_path: str) -> None:
    """/sys/class/drm/NAME/device -> /sys/devices/PCI_PATH, as the kernel lays it out."""
    device = root / "devices" / pci_path
    device.mkdir(parents=True)
    card = root / "class" / "drm" / name
    card.mkdir(parents=True)
    os.symlink(device, card / "device")


def test_pci_address_walks_bridges(tmp_path):
    make_card(tmp_path, "card0", "pci0000:00/0000:00:1c.0/0000:02:00.0")
    assert pci_address(str(tmp_path / "class/drm/card0/device")) == "pci/0000/1c.0/00.0"


def test_single_card_is_found_and_connectors_are_not_cards(tmp_path):
    make_card(tmp_path, "card0", "pci0000:00/0000:00:02.0")
    (tmp_path / "class/drm/card0-Virtual-1").mkdir()
    assert find_display_device(str(tmp_path / "class/drm")) == "pci/0000/02.0"


def test_no_card_or_several_cards_give_no_address(tmp_path):
    (tmp_path / "class/drm").mkdir(parents=True)
    assert find_display_device(str(tmp_path / "class/drm")) is None
    make_card(tmp_path, "card0", "pci0000:00/0000:00:02.0")
    make_card(tmp_path, "card1", "pci0000:00/0000:00:03.0")
    assert find_display_device(str(tmp_path / "class/drm")) is None


def test_non_pci_device_gives_no_address(tmp_path):
    make_card(tmp_path, "card0", "platform/simple-framebuffer.0")
    assert find_display_device(str(tmp_path / "class/drm")) is None
