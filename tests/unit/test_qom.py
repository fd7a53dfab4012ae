"""QOM as devices use it: types, class inheritance, instance init order, static properties, realize."""
import attrs
import pytest

from qblock.qom.object import (
    TYPE_DEVICE,
    DEFINE_PROP_BIT,
    DEFINE_PROP_BOOL,
    DEFINE_PROP_ENUM,
    DEFINE_PROP_ON_OFF_AUTO,
    DEFINE_PROP_SIZE,
    DEFINE_PROP_STRING,
    DEFINE_PROP_UINT16,
    DEFINE_PROP_UINT32,
    DeviceState,
    OnOffAuto,
    PropertyInfoEnum,
    TypeInfo,
    device_class_set_props,
    object_class_by_name,
    object_dynamic_cast,
    object_get_typename,
    object_new,
    object_property_get,
    object_property_parse,
    object_property_set,
    object_unparent,
    qdev_device_add,
    qdev_new,
    qdev_realize,
    qdev_unrealize,
    type_register_static,
)
from qblock.util.error import Error

LOG: list[tuple[str, str]] = []


@attrs.define(eq=False)
class TestDevState(DeviceState):
    __test__ = False
    count: int = 0
    flags: int = 0
    name: str | None = None
    mode: OnOffAuto = OnOffAuto.ON_OFF_AUTO_AUTO
    size: int = 0
    on: bool = False
    small: int = 0


def _base_class_init(klass, data):
    klass.realize = lambda dev: LOG.append(("realize", object_get_typename(dev)))
    klass.unrealize = lambda dev: LOG.append(("unrealize", object_get_typename(dev)))
    klass.hook = "base"
    device_class_set_props(klass, [DEFINE_PROP_UINT32("count", "count", 7), DEFINE_PROP_BIT("bit3", "flags", 3, True)])


def _child_class_init(klass, data):
    klass.hook = "child"
    device_class_set_props(klass, [
        DEFINE_PROP_STRING("name", "name"),
        DEFINE_PROP_ON_OFF_AUTO("mode", "mode"),
        DEFINE_PROP_SIZE("size", "size", 4096),
        DEFINE_PROP_BOOL("on", "on", True),
        DEFINE_PROP_UINT16("small", "small", 1),
        DEFINE_PROP_ENUM("mode2", "mode", PropertyInfoEnum("OnOffAuto", OnOffAuto), OnOffAuto.ON_OFF_AUTO_ON),
    ])


def _child_realize(dev):
    if dev.count == 13:
        raise Error("13 is unlucky")
    LOG.append(("realize", "child"))


def _grandchild_class_init(klass, data):
    klass.realize = _child_realize


if object_class_by_name("test-base-dev") is None:
    type_register_static(TypeInfo(name="test-base-dev", parent=TYPE_DEVICE, instance_struct=TestDevState,
                                  abstract=True, class_init=_base_class_init,
                                  instance_init=lambda o: LOG.append(("init", "base"))))
    type_register_static(TypeInfo(name="test-child-dev", parent="test-base-dev", class_init=_child_class_init,
                                  instance_init=lambda o: LOG.append(("init", "child"))))
    type_register_static(TypeInfo(name="test-grandchild-dev", parent="test-child-dev",
                                  class_init=_grandchild_class_init))


@pytest.fixture(autouse=True)
def _clear_log():
    LOG.clear()
    yield


def test_instance_init_runs_from_the_root_type_down():
    """object_new runs every ancestor's instance_init before the type's own."""
    dev = object_new("test-child-dev")
    assert LOG == [("init", "base"), ("init", "child")]
    assert object_dynamic_cast(dev, "test-base-dev") is dev
    assert object_dynamic_cast(dev, "test-grandchild-dev") is None


def test_class_inherits_hooks_and_overrides_its_own():
    """A subtype's class starts as a copy of its parent's: unset hooks are inherited, set ones replace."""
    base = object_class_by_name("test-base-dev")
    child = object_class_by_name("test-child-dev")
    grand = object_class_by_name("test-grandchild-dev")
    assert base.hook == "base" and child.hook == "child" and grand.hook == "child"
    assert child.unrealize is base.unrealize
    assert grand.realize is _child_realize


def test_abstract_and_unknown_types_cannot_be_instantiated():
    """An abstract type or an unknown name is refused with QEMU's messages."""
    with pytest.raises(Error, match="abstract"):
        object_new("test-base-dev")
    with pytest.raises(Error, match="'nope' is not a valid device model name"):
        qdev_new("nope")
    with pytest.raises(Error, match="Parameter 'driver' expects non-abstract device type"):
        qdev_device_add({"driver": "test-base-dev"})
    with pytest.raises(Error, match="Parameter 'driver' is missing"):
        qdev_device_add({})


def test_duplicate_registration_is_an_error():
    """Registering a type name twice fails as QEMU's type_new does."""
    with pytest.raises(Error, match="Registering `test-child-dev' which already exists"):
        type_register_static(TypeInfo(name="test-child-dev", parent=TYPE_DEVICE))


def test_static_properties_get_their_defaults_from_every_class():
    """Properties of the type and of its parents exist once each, with their defaults."""
    dev = qdev_new("test-grandchild-dev")
    assert dev.count == 7 and dev.flags == 8 and dev.size == 4096 and dev.on is True and dev.small == 1
    assert dev.mode is OnOffAuto.ON_OFF_AUTO_ON     # mode2's default was applied last
    assert object_property_get(dev, "bit3") is True
    assert sorted(dev.properties) == ["bit3", "count", "mode", "mode2", "name", "on", "realized", "size",
                                      "small"]


def test_properties_parse_strings_like_the_command_line():
    """String values are parsed per type: numbers, sizes, on/off, enums, bits."""
    dev = qdev_new("test-child-dev")
    object_property_parse(dev, "count", "0x10")
    object_property_parse(dev, "size", "64k")
    object_property_parse(dev, "on", "off")
    object_property_parse(dev, "mode", "off")
    object_property_parse(dev, "bit3", "off")
    object_property_parse(dev, "name", "disk0")
    assert (dev.count, dev.size, dev.on, dev.mode, dev.flags, dev.name) == (
        16, 65536, False, OnOffAuto.ON_OFF_AUTO_OFF, 0, "disk0")


@pytest.mark.parametrize("name, value, message", [
    ("count", "abc", "Parameter 'count' expects a uint64 value"),
    ("small", "70000", "Parameter 'small' expects uint16"),
    ("small", 70000, "Parameter 'small' expects uint16"),
    ("count", True, "Invalid parameter type for 'count', expected: integer"),
    ("on", "maybe", "Parameter 'on' expects 'on' or 'off'"),
    ("on", 1, "Invalid parameter type for 'on', expected: boolean"),
    ("mode", "sometimes", "Parameter 'mode' does not accept value 'sometimes'"),
    ("size", "12Q", "Parameter 'size' expects a size value"),
    ("nosuch", "1", "Property 'test-child-dev.nosuch' not found"),
])
def test_bad_property_values_fail_with_qemu_messages(name, value, message):
    """Each kind of bad value is refused with the message QEMU prints, and changes nothing."""
    dev = qdev_new("test-child-dev")
    before = attrs.asdict(dev, recurse=False, filter=lambda a, v: a.name not in ("class_", "properties"))
    with pytest.raises(Error) as exc:
        object_property_set(dev, name, value)
    assert str(exc.value) == message
    assert before == attrs.asdict(dev, recurse=False, filter=lambda a, v: a.name not in ("class_", "properties"))


def test_realize_runs_the_class_hook_and_locks_properties():
    """After realize a property cannot change; unrealize runs the class's hook."""
    dev = qdev_new("test-child-dev")
    qdev_realize(dev)
    assert dev.realized and LOG[-1] == ("realize", "test-child-dev")
    with pytest.raises(Error, match=r"Attempt to set property 'count' on anonymous device \(type 'test-child-dev'\) "
                                    r"after it was realized"):
        object_property_set(dev, "count", 1)
    qdev_unrealize(dev)
    assert not dev.realized and LOG[-1] == ("unrealize", "test-child-dev")


def test_device_add_sets_properties_and_cleans_up_on_failure():
    """qdev_device_add configures and realizes; a realize error leaves no realized device behind."""
    dev = qdev_device_add({"driver": "test-grandchild-dev", "id": "d0", "count": "5", "name": "x"})
    assert dev.realized and dev.id == "d0" and dev.count == 5
    with pytest.raises(Error, match="Attempt to set property 'count' on device 'd0'"):
        object_property_set(dev, "count", 1)
    object_unparent(dev)
    assert not dev.realized and dev.properties == {}
    with pytest.raises(Error, match="13 is unlucky"):
        qdev_device_add({"driver": "test-grandchild-dev", "count": 13})
