"""QOM, the part devices need: QEMU's qom/object.c, hw/core/qdev.c and hw/core/qdev-properties.c.

Types are registered from a :class:`TypeInfo` (``type_register_static``,
usually from a function passed to ``type_init``).  A type's class is built on
first use the way ``type_initialize`` builds it: a copy of the parent's class,
then every ancestor's ``class_base_init``, then the type's own ``class_init``.
``object_new`` creates an instance of the type's ``instance_struct`` (the
Python class standing for QEMU's ``instance_size``) and runs every
``instance_init`` from the root type down.

Devices (``TYPE_DEVICE``) get their class's static properties
(:class:`Property`, ``DEFINE_PROP_*``) with defaults at instance_init, a
``realized`` property, ``qdev_realize``/``qdev_unrealize`` and
``qdev_device_add`` (``-device driver=...,prop=value``).  Property values are
parsed from strings as QEMU's string input visitor parses them, or checked
when given typed, with QEMU's error messages.

Left out: interfaces, the composition tree and object paths, class
properties, aliases, hotplug handlers, buses (a virtio device here is plugged
straight into its transport), migration state.  ``type_init`` runs its
function at once (QEMU runs it at start-up, from ``module_call_init``).
"""
from __future__ import annotations

import enum
import itertools
from typing import Any, Callable

import attrs

from qblock.util.cutils import qemu_strtosz, qemu_strtou64
from qblock.util.error import Error

__all__ = [
    "TYPE_OBJECT", "TYPE_DEVICE", "TypeInfo", "TypeImpl", "ObjectClass", "Object", "ObjectProperty",
    "DeviceState", "OnOffAuto", "PropertyInfo", "Property",
    "type_register_static", "type_register", "type_init", "object_class_by_name", "object_class_get_name",
    "object_class_get_parent", "object_class_is_abstract", "object_class_dynamic_cast", "object_new",
    "object_new_with_type", "object_dynamic_cast", "object_dynamic_cast_assert", "object_get_typename",
    "object_get_class", "object_ref", "object_unref", "object_unparent", "object_property_add",
    "object_property_find", "object_property_set", "object_property_parse", "object_property_get",
    "object_property_del", "device_class_set_props", "qdev_new", "qdev_realize", "qdev_unrealize",
    "qdev_device_add", "qdev_prop_set", "qdev_get_prop_ptr", "qdev_prop_set_field",
    "QERR_INVALID_PARAMETER_VALUE", "QERR_INVALID_PARAMETER_TYPE", "QERR_PROPERTY_VALUE_OUT_OF_RANGE",
    "qdev_prop_uint8", "qdev_prop_uint16", "qdev_prop_uint32", "qdev_prop_uint64", "qdev_prop_bool",
    "qdev_prop_bit", "qdev_prop_bit64", "qdev_prop_string", "qdev_prop_size", "qdev_prop_on_off_auto",
    "DEFINE_PROP_UINT8", "DEFINE_PROP_UINT16", "DEFINE_PROP_UINT32", "DEFINE_PROP_UINT64", "DEFINE_PROP_BOOL",
    "DEFINE_PROP_BIT", "DEFINE_PROP_BIT64", "DEFINE_PROP_STRING", "DEFINE_PROP_SIZE", "DEFINE_PROP_ON_OFF_AUTO",
    "DEFINE_PROP_ENUM", "DEFINE_PROP_LINK", "PropertyInfoEnum", "PropertyInfoLink",
]

TYPE_OBJECT = "object"
TYPE_DEVICE = "device"

# QERR_* texts (include/qapi/qmp/qerror.h)
QERR_INVALID_PARAMETER_VALUE = "Parameter '%s' expects %s"
QERR_INVALID_PARAMETER_TYPE = "Invalid parameter type for '%s', expected: %s"
QERR_PROPERTY_VALUE_OUT_OF_RANGE = "Property %s.%s doesn't take value %d (minimum: %d, maximum: %d)"
QERR_MISSING_PARAMETER = "Parameter '%s' is missing"
QERR_PERMISSION_DENIED = "Insufficient permission to perform this operation"


# ---------------------------------------------------------------------------
# Types and classes


@attrs.define(frozen=True)
class TypeInfo:
    """What a type declares (QEMU's TypeInfo); ``instance_struct`` is the Python class of its instances."""

    name: str
    parent: str | None = TYPE_OBJECT
    instance_struct: type | None = None
    instance_init: Callable[[Any], None] | None = None
    instance_finalize: Callable[[Any], None] | None = None
    abstract: bool = False
    class_init: Callable[["ObjectClass", Any], None] | None = None
    class_base_init: Callable[["ObjectClass", Any], None] | None = None
    class_data: Any = None


class ObjectClass:
    """A type's class (QEMU's ObjectClass and every XxxClass built on it): a bag of hooks and data.

    A subclass's class starts as a copy of its parent's (QEMU's memcpy in
    type_initialize), so hooks a subtype does not set are inherited.
    """

    def __init__(self, type_: "TypeImpl"):
        self.type = type_

    def __repr__(self) -> str:
        return f"<ObjectClass {self.type.name}>"


@attrs.define(eq=False)
class TypeImpl:
    """A registered type (QEMU's TypeImpl)."""

    name: str
    info: TypeInfo
    parent_type: "TypeImpl | None" = None
    klass: ObjectClass | None = None

    @property
    def abstract(self) -> bool:
        return self.info.abstract


_type_table: dict[str, TypeImpl] = {}


def type_register(info: TypeInfo) -> TypeImpl:
    """Add a type to the table; registering a name twice is an error, as in QEMU (which aborts)."""
    if info.name in _type_table:
        raise Error(f"Registering `{info.name}' which already exists")
    ti = TypeImpl(info.name, info)
    _type_table[info.name] = ti
    return ti


def type_register_static(info: TypeInfo) -> TypeImpl:
    return type_register(info)


def type_init(fn: Callable[[], None]) -> Callable[[], None]:
    """Run a type-registering function (QEMU runs it at start-up; qblock at import, which is start-up here)."""
    fn()
    return fn


def _type_get_by_name(name: str | None) -> TypeImpl | None:
    return _type_table.get(name) if name is not None else None


def _type_get_parent(ti: TypeImpl) -> TypeImpl | None:
    if ti.parent_type is None and ti.info.parent is not None:
        parent = _type_get_by_name(ti.info.parent)
        if parent is None:
            raise Error(f"Type '{ti.name}' has unknown parent type '{ti.info.parent}'")
        ti.parent_type = parent
    return ti.parent_type


def _type_is_ancestor(ti: TypeImpl | None, target: TypeImpl) -> bool:
    while ti is not None:
        if ti is target:
            return True
        ti = _type_get_parent(ti)
    return False


def _type_initialize(ti: TypeImpl) -> ObjectClass:
    if ti.klass is not None:
        return ti.klass
    parent = _type_get_parent(ti)
    klass = ObjectClass(ti)
    if parent is not None:
        pclass = _type_initialize(parent)
        klass.__dict__.update({k: v for k, v in pclass.__dict__.items() if k != "type"})
        p = parent
        while p is not None:
            if p.info.class_base_init is not None:
                p.info.class_base_init(klass, ti.info.class_data)
            p = _type_get_parent(p)
    ti.klass = klass
    if ti.info.class_init is not None:
        ti.info.class_init(klass, ti.info.class_data)
    return klass


def object_class_by_name(name: str) -> ObjectClass | None:
    ti = _type_get_by_name(name)
    return _type_initialize(ti) if ti is not None else None


def object_class_get_name(klass: ObjectClass) -> str:
    return klass.type.name


def object_class_get_parent(klass: ObjectClass) -> ObjectClass | None:
    parent = _type_get_parent(klass.type)
    return _type_initialize(parent) if parent is not None else None


def object_class_is_abstract(klass: ObjectClass) -> bool:
    return klass.type.abstract


def object_class_dynamic_cast(klass: ObjectClass | None, typename: str) -> ObjectClass | None:
    """``klass`` if its type is ``typename`` or derives from it, else None."""
    target = _type_get_by_name(typename)
    if klass is None or target is None:
        return None
    return klass if _type_is_ancestor(klass.type, target) else None


# ---------------------------------------------------------------------------
# Objects and their properties


@attrs.define(eq=False)
class ObjectProperty:
    """A property of one object (QEMU's ObjectProperty): ``set(obj, value)``, ``get(obj)``, ``release(obj)``."""

    name: str
    type: str
    get: Callable[[Any], Any] | None = None
    set: Callable[[Any, Any], None] | None = None
    release: Callable[[Any], None] | None = None
    description: str | None = None


@attrs.define(eq=False)
class Object:
    """The header every QOM instance starts with (QEMU's Object)."""

    class_: ObjectClass | None = attrs.field(default=None, repr=False)
    properties: dict[str, ObjectProperty] = attrs.field(factory=dict, repr=False)
    ref: int = attrs.field(default=1, repr=False)
    parent: Any = attrs.field(default=None, repr=False)


def object_get_class(obj: Object) -> ObjectClass:
    return obj.class_


def object_get_typename(obj: Object) -> str:
    return obj.class_.type.name


def _object_init_with_type(obj: Object, ti: TypeImpl) -> None:
    parent = _type_get_parent(ti)
    if parent is not None:
        _object_init_with_type(obj, parent)
    if ti.info.instance_init is not None:
        ti.info.instance_init(obj)


def _instance_struct(ti: TypeImpl) -> type:
    t: TypeImpl | None = ti
    while t is not None:
        if t.info.instance_struct is not None:
            return t.info.instance_struct
        t = _type_get_parent(t)
    return Object


def object_new_with_type(ti: TypeImpl) -> Object:
    klass = _type_initialize(ti)
    if ti.abstract:
        raise Error(f"Object type '{ti.name}' is abstract")
    obj = _instance_struct(ti)()
    obj.class_ = klass
    _object_init_with_type(obj, ti)
    return obj


def object_new(typename: str) -> Object:
    """A new instance of ``typename`` with every instance_init run (one reference, held by the caller)."""
    ti = _type_get_by_name(typename)
    if ti is None:
        raise Error(f"unknown type '{typename}'")
    return object_new_with_type(ti)


def object_dynamic_cast(obj: Object | None, typename: str) -> Object | None:
    if obj is None or obj.class_ is None:
        return None
    return obj if object_class_dynamic_cast(obj.class_, typename) is not None else None


def object_dynamic_cast_assert(obj: Object, typename: str) -> Object:
    """QEMU's OBJECT_CHECK: ``obj`` when it is a ``typename``, else an assertion failure."""
    if object_dynamic_cast(obj, typename) is None:
        raise AssertionError(f"Object {obj!r} is not an instance of type {typename}")
    return obj


def object_ref(obj: Object) -> Object:
    obj.ref += 1
    return obj


def _object_finalize(obj: Object) -> None:
    for prop in list(obj.properties.values())[::-1]:
        if prop.release is not None:
            prop.release(obj)
    obj.properties.clear()
    ti: TypeImpl | None = obj.class_.type
    while ti is not None:
        if ti.info.instance_finalize is not None:
            ti.info.instance_finalize(obj)
        ti = _type_get_parent(ti)


def object_unref(obj: Object | None) -> None:
    """Drop a reference; the last one finalizes the object (property release hooks, instance_finalize)."""
    if obj is None:
        return
    if obj.ref <= 0:
        raise AssertionError(f"object_unref of {obj!r} with ref {obj.ref}")
    obj.ref -= 1
    if obj.ref == 0:
        _object_finalize(obj)


def object_unparent(obj: Object) -> None:
    """Remove the object from use: a realized device is unrealized first, then the reference goes."""
    if isinstance(obj, DeviceState) and obj.realized:
        qdev_unrealize(obj)
    object_unref(obj)


def object_property_add(obj: Object, name: str, type: str, get=None, set=None, release=None,
                        description: str | None = None) -> ObjectProperty:
    if name in obj.properties:
        raise Error(f"attempt to add duplicate property '{name}' to object (type '{object_get_typename(obj)}')")
    prop = ObjectProperty(name, type, get, set, release, description)
    obj.properties[name] = prop
    return prop


def object_property_del(obj: Object, name: str) -> None:
    prop = obj.properties.pop(name, None)
    if prop is not None and prop.release is not None:
        prop.release(obj)


def object_property_find(obj: Object, name: str) -> ObjectProperty | None:
    return obj.properties.get(name)


def _property_find_or_raise(obj: Object, name: str) -> ObjectProperty:
    prop = obj.properties.get(name)
    if prop is None:
        raise Error(f"Property '{object_get_typename(obj)}.{name}' not found")
    return prop


def object_property_set(obj: Object, name: str, value: Any) -> None:
    """Set a property from a typed value (a string is parsed, as QEMU's string input visitor does)."""
    prop = _property_find_or_raise(obj, name)
    if prop.set is None:
        raise Error(QERR_PERMISSION_DENIED)
    prop.set(obj, value)


def object_property_parse(obj: Object, name: str, string: str) -> None:
    """Set a property from its command-line spelling."""
    if not isinstance(string, str):
        raise TypeError("object_property_parse takes a string")
    object_property_set(obj, name, string)


def object_property_get(obj: Object, name: str) -> Any:
    prop = _property_find_or_raise(obj, name)
    if prop.get is None:
        raise Error(QERR_PERMISSION_DENIED)
    return prop.get(obj)


# ---------------------------------------------------------------------------
# Static device properties (hw/core/qdev-properties.c)


class OnOffAuto(enum.Enum):
    """QAPI's OnOffAuto."""

    ON_OFF_AUTO_AUTO = "auto"
    ON_OFF_AUTO_ON = "on"
    ON_OFF_AUTO_OFF = "off"


class PropertyInfo:
    """How one kind of static property parses, checks, stores and releases its value (QEMU's PropertyInfo).

    ``parse(dev, prop, string)`` turns a command-line string into a value;
    ``check(dev, prop, value)`` validates a typed value; both raise
    :class:`Error` with QEMU's message.  ``set`` stores at ``prop.field``
    (QEMU's offset, here a dotted attribute path); kinds with side effects
    (a drive attaching itself to the device) override it.
    """

    name = "unknown"
    takes_strings = False     # True when a string is the value itself, not a spelling of one

    def parse(self, dev: "DeviceState", prop: "Property", string: str) -> Any:
        raise Error(QERR_INVALID_PARAMETER_TYPE % (prop.name, self.name))

    def check(self, dev: "DeviceState", prop: "Property", value: Any) -> Any:
        return value

    def get(self, dev: "DeviceState", prop: "Property") -> Any:
        return qdev_get_prop_ptr(dev, prop)

    def set(self, dev: "DeviceState", prop: "Property", value: Any) -> None:
        if isinstance(value, str) and not self.takes_strings:
            value = self.parse(dev, prop, value)
        else:
            value = self.check(dev, prop, value)
        qdev_prop_set_field(dev, prop, value)

    def set_default_value(self, dev: "DeviceState", prop: "Property") -> None:
        qdev_prop_set_field(dev, prop, prop.default)

    def release(self, dev: "DeviceState", prop: "Property") -> None:
        pass


def _get_field(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_field(obj: Any, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    setattr(obj, parts[-1], value)


def qdev_get_prop_ptr(dev: "DeviceState", prop: "Property") -> Any:
    """The value stored for ``prop`` (QEMU returns a pointer into the device struct)."""
    return _get_field(dev, prop.field)


def qdev_prop_set_field(dev: "DeviceState", prop: "Property", value: Any) -> None:
    """Store ``value`` where ``prop`` lives (QEMU writes through the pointer)."""
    _set_field(dev, prop.field, value)


def _parse_uint(prop: "Property", string: str) -> int:
    err, value = qemu_strtou64(string.strip(), 0)
    if err < 0:
        raise Error(QERR_INVALID_PARAMETER_VALUE % (prop.name, "a uint64 value"))
    return value


class PropertyInfoUint(PropertyInfo):
    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"uint{bits}"

    def check(self, dev, prop, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise Error(QERR_INVALID_PARAMETER_TYPE % (prop.name, "integer"))
        if value < 0 or value >= 1 << self.bits:
            raise Error(QERR_INVALID_PARAMETER_VALUE % (prop.name, self.name))
        return value

    def parse(self, dev, prop, string):
        return self.check(dev, prop, _parse_uint(prop, string))


def _parse_bool(prop: "Property", string: str) -> bool:
    s = string.strip()
    if s in ("on", "yes", "true"):
        return True
    if s in ("off", "no", "false"):
        return False
    raise Error(QERR_INVALID_PARAMETER_VALUE % (prop.name, "'on' or 'off'"))


class PropertyInfoBool(PropertyInfo):
    name = "bool"

    def check(self, dev, prop, value):
        if not isinstance(value, bool):
            raise Error(QERR_INVALID_PARAMETER_TYPE % (prop.name, "boolean"))
        return value

    def parse(self, dev, prop, string):
        return _parse_bool(prop, string)


class PropertyInfoBit(PropertyInfo):
    """One bit of an integer field (DEFINE_PROP_BIT / DEFINE_PROP_BIT64)."""

    name = "bool"

    def get(self, dev, prop):
        return bool(_get_field(dev, prop.field) >> prop.bitnr & 1)

    def set(self, dev, prop, value):
        value = _parse_bool(prop, value) if isinstance(value, str) else PropertyInfoBool.check(self, dev, prop, value)
        word = _get_field(dev, prop.field)
        word = word | (1 << prop.bitnr) if value else word & ~(1 << prop.bitnr)
        _set_field(dev, prop.field, word)

    def set_default_value(self, dev, prop):
        self.set(dev, prop, bool(prop.default))


class PropertyInfoString(PropertyInfo):
    name = "str"
    takes_strings = True

    def check(self, dev, prop, value):
        if value is not None and not isinstance(value, str):
            raise Error(QERR_INVALID_PARAMETER_TYPE % (prop.name, "string"))
        return value


class PropertyInfoSize(PropertyInfo):
    name = "size"

    def check(self, dev, prop, value):
        return PropertyInfoUint.check(qdev_prop_uint64, dev, prop, value)

    def parse(self, dev, prop, string):
        err, value = qemu_strtosz(string)
        if err < 0:
            raise Error(QERR_INVALID_PARAMETER_VALUE % (prop.name, "a size value"))
        return value


class PropertyInfoEnum(PropertyInfo):
    """A QAPI enum: the value is a member of ``enum_cls``, spelled by its value string."""

    def __init__(self, name: str, enum_cls: type[enum.Enum]):
        self.name = name
        self.enum_cls = enum_cls

    def check(self, dev, prop, value):
        if not isinstance(value, self.enum_cls):
            raise Error(QERR_INVALID_PARAMETER_TYPE % (prop.name, self.name))
        return value

    def parse(self, dev, prop, string):
        for member in self.enum_cls:
            if member.value == string:
                return member
        # later QEMU's wording (QEMU 4.x said "Invalid parameter '<value>'")
        raise Error(f"Parameter '{prop.name}' does not accept value '{string}'")


class PropertyInfoLink(PropertyInfo):
    """A link to another object (DEFINE_PROP_LINK): set from the object, or from an id ``resolve`` finds."""

    def __init__(self, type_name: str, target_class: type, resolve: Callable[[str], Any] | None):
        self.name = f"link<{type_name}>"
        self.type_name = type_name
        self.target_class = target_class
        self.resolve = resolve

    def check(self, dev, prop, value):
        if value is not None and not isinstance(value, self.target_class):
            raise Error(QERR_INVALID_PARAMETER_TYPE % (prop.name, self.type_name))
        return value

    def parse(self, dev, prop, string):
        if string == "":
            return None
        target = self.resolve(string) if self.resolve is not None else None
        if target is None:
            raise Error(f"Device '{string}' not found")
        return self.check(dev, prop, target)


qdev_prop_uint8 = PropertyInfoUint(8)
qdev_prop_uint16 = PropertyInfoUint(16)
qdev_prop_uint32 = PropertyInfoUint(32)
qdev_prop_uint64 = PropertyInfoUint(64)
qdev_prop_bool = PropertyInfoBool()
qdev_prop_bit = PropertyInfoBit()
qdev_prop_bit64 = PropertyInfoBit()
qdev_prop_string = PropertyInfoString()
qdev_prop_size = PropertyInfoSize()
qdev_prop_on_off_auto = PropertyInfoEnum("OnOffAuto", OnOffAuto)


@attrs.define(frozen=True)
class Property:
    """A static device property (QEMU's Property): its name, kind, where it is stored and its default."""

    name: str
    info: PropertyInfo
    field: str
    default: Any = None
    bitnr: int = 0


def DEFINE_PROP_UINT8(name: str, field: str, default: int = 0) -> Property:
    return Property(name, qdev_prop_uint8, field, default)


def DEFINE_PROP_UINT16(name: str, field: str, default: int = 0) -> Property:
    return Property(name, qdev_prop_uint16, field, default)


def DEFINE_PROP_UINT32(name: str, field: str, default: int = 0) -> Property:
    return Property(name, qdev_prop_uint32, field, default)


def DEFINE_PROP_UINT64(name: str, field: str, default: int = 0) -> Property:
    return Property(name, qdev_prop_uint64, field, default)


def DEFINE_PROP_BOOL(name: str, field: str, default: bool = False) -> Property:
    return Property(name, qdev_prop_bool, field, default)


def DEFINE_PROP_BIT(name: str, field: str, bitnr: int, default: bool) -> Property:
    return Property(name, qdev_prop_bit, field, default, bitnr)


def DEFINE_PROP_BIT64(name: str, field: str, bitnr: int, default: bool) -> Property:
    return Property(name, qdev_prop_bit64, field, default, bitnr)


def DEFINE_PROP_STRING(name: str, field: str) -> Property:
    return Property(name, qdev_prop_string, field, None)


def DEFINE_PROP_SIZE(name: str, field: str, default: int = 0) -> Property:
    return Property(name, qdev_prop_size, field, default)


def DEFINE_PROP_ON_OFF_AUTO(name: str, field: str, default: OnOffAuto = OnOffAuto.ON_OFF_AUTO_AUTO) -> Property:
    return Property(name, qdev_prop_on_off_auto, field, default)


def DEFINE_PROP_ENUM(name: str, field: str, info: PropertyInfoEnum, default: enum.Enum) -> Property:
    return Property(name, info, field, default)


def DEFINE_PROP_LINK(name: str, field: str, info: PropertyInfoLink) -> Property:
    return Property(name, info, field, None)


# ---------------------------------------------------------------------------
# Devices (hw/core/qdev.c)


_device_numbers = itertools.count(1)


@attrs.define(eq=False)
class DeviceState(Object):
    """A device (QEMU's DeviceState)."""

    id: str | None = None
    realized: bool = False
    instance_no: int = attrs.field(factory=lambda: next(_device_numbers), repr=False)

    @property
    def trace_name(self) -> str:
        """The device's id, or ``<type>.<n>`` for an anonymous one (stable from run to run)."""
        return self.id or f"{object_get_typename(self)}.{self.instance_no}"


def device_class_set_props(dc: ObjectClass, props: list[Property]) -> None:
    dc.props = list(props)


def _qdev_property_add_static(dev: DeviceState, prop: Property) -> None:
    info = prop.info

    def get(obj):
        return info.get(obj, prop)

    def set(obj, value):
        if obj.realized:
            if obj.id:
                raise Error(f"Attempt to set property '{prop.name}' on device '{obj.id}' "
                            f"(type '{object_get_typename(obj)}') after it was realized")
            raise Error(f"Attempt to set property '{prop.name}' on anonymous device "
                        f"(type '{object_get_typename(obj)}') after it was realized")
        info.set(obj, prop, value)

    def release(obj):
        info.release(obj, prop)

    object_property_add(dev, prop.name, info.name, get, set, release)
    info.set_default_value(dev, prop)


def _device_initfn(obj: Object) -> None:
    dev: DeviceState = obj
    klass = dev.class_
    device_class = object_class_by_name(TYPE_DEVICE)
    while klass is not None and klass is not device_class:
        for prop in getattr(klass, "props", ()):
            _qdev_property_add_static(dev, prop)
        klass = object_class_get_parent(klass)
    object_property_add(dev, "realized", "bool",
                        lambda o: o.realized,
                        lambda o, v: _device_set_realized(o, _parse_bool(Property("realized", qdev_prop_bool, ""), v)
                                                          if isinstance(v, str) else bool(v)))


def _device_set_realized(dev: DeviceState, value: bool) -> None:
    dc = dev.class_
    if value and not dev.realized:
        if dc.realize is not None:
            dc.realize(dev)     # raises Error; the device stays unrealized then
        dev.realized = True
    elif not value and dev.realized:
        if dc.unrealize is not None:
            dc.unrealize(dev)
        dev.realized = False


def _device_class_init(klass: ObjectClass, data: Any) -> None:
    klass.realize = None
    klass.unrealize = None
    klass.reset = None
    klass.desc = None
    klass.categories = set()
    klass.props = []


def _device_class_base_init(klass: ObjectClass, data: Any) -> None:
    # Each class lists only its own properties; instance_init walks the parents for theirs.
    klass.props = []


def qdev_new(typename: str) -> DeviceState:
    """A new, unrealized device of ``typename``."""
    oc = object_class_by_name(typename)
    if oc is None or object_class_dynamic_cast(oc, TYPE_DEVICE) is None:
        raise Error(f"'{typename}' is not a valid device model name")
    return object_new(typename)


def qdev_realize(dev: DeviceState) -> None:
    """Realize the device (QEMU 4.x: setting ``realized`` to true); raises Error and leaves it unrealized."""
    object_property_set(dev, "realized", True)


def qdev_unrealize(dev: DeviceState) -> None:
    object_property_set(dev, "realized", False)


def qdev_prop_set(dev: DeviceState, name: str, value: Any) -> None:
    """Set a static property from a typed value or its string spelling (the qdev_prop_set_* family)."""
    object_property_set(dev, name, value)


def qdev_device_add(opts: dict[str, Any]) -> DeviceState:
    """Create, configure and realize a device from ``-device`` options: ``driver``, ``id`` and properties.

    Values that are strings are parsed; other values are set as they are.
    On any error nothing is left behind and Error carries QEMU's message.
    """
    opts = dict(opts)
    driver = opts.pop("driver", None)
    if driver is None:
        raise Error(QERR_MISSING_PARAMETER % "driver")
    oc = object_class_by_name(driver)
    if oc is None or object_class_dynamic_cast(oc, TYPE_DEVICE) is None:
        raise Error(f"'{driver}' is not a valid device model name")
    if object_class_is_abstract(oc):
        raise Error(QERR_INVALID_PARAMETER_VALUE % ("driver", "non-abstract device type"))
    dev: DeviceState = object_new(driver)
    try:
        dev.id = opts.pop("id", None)
        for name, value in opts.items():
            object_property_set(dev, name, value)
        qdev_realize(dev)
    except BaseException:
        object_unparent(dev)
        raise
    return dev


def _register_types() -> None:
    type_register_static(TypeInfo(name=TYPE_OBJECT, parent=None, instance_struct=Object, abstract=True))
    type_register_static(TypeInfo(name=TYPE_DEVICE, parent=TYPE_OBJECT, instance_struct=DeviceState,
                                  instance_init=_device_initfn, abstract=True,
                                  class_init=_device_class_init, class_base_init=_device_class_base_init))


type_init(_register_types)
