"""MJCF models of the custom tasks, derived programmatically from dm_control's suite models.

The custom tasks use dm_control's models with small edits:

* walker: floor plane half-length 500 (dm_control: 250).
* cheetah: ground plane half-length 200 (dm_control: 100).
* reacher (three links): dm_control's two-link arm becomes three links of 0.09 each
  (shoulder0 unlimited, shoulder1 and wrist limited to +-80 degrees), one motor per joint.
* hopper, pendulum, ball_in_cup: unchanged.

Each function returns `(xml_bytes, assets)` ready for `Physics.from_xml_string(*...)`.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from dm_control.suite import common

Model = tuple[bytes, dict]


def _load(filename: str) -> ET.Element:
    return ET.fromstring(common.read_model(filename))


def _dump(root: ET.Element) -> Model:
    return ET.tostring(root), common.ASSETS


def _named(root: ET.Element, tag: str, name: str) -> ET.Element:
    """The unique `<tag name=name>` element anywhere under `root`."""
    found = root.findall(f".//{tag}[@name='{name}']")
    if len(found) != 1:
        raise RuntimeError(f"expected one <{tag} name={name!r}> in the dm_control model, found {len(found)}")
    return found[0]


def _with_plane_half_length(filename: str, geom_name: str, half_length: float) -> Model:
    root = _load(filename)
    plane = _named(root, "geom", geom_name)
    sizes = plane.get("size").split()
    sizes[0] = f"{half_length:g}"
    plane.set("size", " ".join(sizes))
    return _dump(root)


def walker_model() -> Model:
    return _with_plane_half_length("walker.xml", "floor", 500)


def cheetah_model() -> Model:
    return _with_plane_half_length("cheetah.xml", "ground", 200)


def hopper_model() -> Model:
    return common.read_model("hopper.xml"), common.ASSETS


def pendulum_model() -> Model:
    return common.read_model("pendulum.xml"), common.ASSETS


def ball_in_cup_model() -> Model:
    return common.read_model("ball_in_cup.xml"), common.ASSETS


_LINK_LENGTH = 0.09
_LIMITED_RANGE = "-80 80"  # degrees (the model's compiler default)


def three_link_reacher_model() -> Model:
    """dm_control's planar reacher with an extra middle link: arm0 -> arm1 -> hand -> finger."""
    root = _load("reacher.xml")
    link = f"0 0 0 {_LINK_LENGTH:g} 0 0"
    offset = f"{_LINK_LENGTH:g} 0 0"

    arm0 = _named(root, "body", "arm")
    arm0.set("name", "arm0")
    arm0_geom = _named(arm0, "geom", "arm")
    arm0_geom.set("name", "arm0")
    arm0_geom.set("fromto", link)
    _named(arm0, "joint", "shoulder").set("name", "shoulder0")

    hand = _named(arm0, "body", "hand")
    arm0.remove(hand)
    arm1 = ET.SubElement(arm0, "body", {"name": "arm1", "pos": offset})
    ET.SubElement(arm1, "geom", {"name": "arm1", "type": "capsule", "fromto": link,
                                 "size": arm0_geom.get("size"), "material": arm0_geom.get("material")})
    ET.SubElement(arm1, "joint", {"name": "shoulder1", "limited": "true", "range": _LIMITED_RANGE})
    arm1.append(hand)
    hand.set("pos", offset)
    _named(hand, "joint", "wrist").set("range", _LIMITED_RANGE)
    _named(hand, "body", "finger").set("pos", offset)

    actuator = root.find("actuator")
    for motor in list(actuator):
        actuator.remove(motor)
    for joint in ("shoulder0", "shoulder1", "wrist"):
        ET.SubElement(actuator, "motor", {"name": joint, "joint": joint})
    return _dump(root)
