"""The D-Bus contract is one set of names: constants, introspection XML, bus policy, activation file,
systemd unit and polkit actions agree, and every exported method names its polkit action."""

from __future__ import annotations

import configparser
import xml.etree.ElementTree as ET
from pathlib import Path

from spice_stream_common import constants
from spice_streamd.dbus_service import PROPERTY_SIGNATURES, StreamingAgentInterface

REPO = Path(__file__).resolve().parents[1]


def interface_xml() -> ET.Element:
    doc = ET.parse(REPO / "dbus" / constants.INTROSPECTION_FILE).getroot()
    iface = doc.find(f"interface[@name='{constants.INTERFACE}']")
    assert iface is not None
    assert doc.get("name") == constants.OBJECT_PATH
    return iface


def test_every_method_names_a_declared_polkit_action_that_denies_by_default():
    methods = {m.get("name") for m in interface_xml().findall("method")}
    assert methods == set(constants.METHOD_ACTIONS)
    policy = ET.parse(REPO / "polkit" / constants.POLKIT_FILE).getroot()
    actions = {a.get("id"): a for a in policy.findall("action")}
    for method, action_id in constants.METHOD_ACTIONS.items():
        assert action_id in actions, f"{method}: action {action_id} is not in the polkit file"
        defaults = actions[action_id].find("defaults")
        assert defaults.findtext("allow_any") == "no"
        assert defaults.findtext("allow_inactive") == "no"


def test_properties_in_the_xml_are_the_ones_exported():
    xml_props = {p.get("name"): p.get("type") for p in interface_xml().findall("property")}
    assert xml_props == PROPERTY_SIGNATURES
    exported = {p.name: p.signature for p in exported_properties()}
    assert exported == xml_props
    for prop in interface_xml().findall("property"):
        assert prop.get("access") == "read", f"{prop.get('name')} must be read-only"


def exported_properties():
    """What dbus-next will export for the interface class (its introspection source)."""
    from dbus_next.service import ServiceInterface

    iface = StreamingAgentInterface(lambda: {})
    return ServiceInterface._get_properties(iface)


def test_bus_name_is_the_same_in_every_system_file():
    policy = ET.parse(REPO / "dbus" / constants.POLICY_FILE).getroot()
    owners = [a.get("own") for a in policy.iter("allow") if a.get("own")]
    assert owners == [constants.BUS_NAME]
    destinations = {a.get("send_destination") for a in policy.iter("allow") if a.get("send_destination")}
    assert destinations == {constants.BUS_NAME}

    activation = configparser.ConfigParser(interpolation=None)
    activation.read(REPO / "dbus" / constants.ACTIVATION_FILE)
    assert activation["D-BUS Service"]["Name"] == constants.BUS_NAME
    assert activation["D-BUS Service"]["SystemdService"] == constants.SYSTEMD_UNIT

    unit = (REPO / "dbus" / constants.SYSTEMD_UNIT).read_text()
    assert f"BusName={constants.BUS_NAME}\n" in unit and "Type=dbus\n" in unit


def test_per_user_properties_are_only_invalidated_and_introspection_says_so():
    """Sessions, WorkerPID and LastError depend on who reads them: a broadcast signal names them
    (EmitsChangedSignal "invalidates") and never carries their values. The XML and what the
    service introspects agree on every property's annotation."""
    from spice_streamd.dbus_service import EMITS_CHANGED, PER_USER

    name = "org.freedesktop.DBus.Property.EmitsChangedSignal"
    in_xml = {p.get("name"): p.find(f"annotation[@name='{name}']").get("value")
              for p in interface_xml().findall("property")}
    assert {p: in_xml[p] for p in PER_USER} == dict.fromkeys(PER_USER, "invalidates")
    assert in_xml["WorkerStats"] == "false"
    assert in_xml == EMITS_CHANGED
    live = StreamingAgentInterface(lambda: {}).introspect().to_xml()
    assert {p.get("name"): p.find(f"annotation[@name='{name}']").get("value")
            for p in live.findall("property")} == in_xml
