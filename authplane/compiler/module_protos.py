"""Envoy 1.40's dynamic-module access logger and bootstrap extension messages, which the
``xds-protos`` release we depend on does not ship yet. Both have the same three fields (Envoy's
``api/envoy/extensions/{access_loggers,bootstrap}/dynamic_modules/v3/dynamic_modules.proto``):
the module, the implementation's name inside it, and its configuration. They are added to the
default descriptor pool once, so ``pack`` and the JSON of ``render`` treat them like any other."""

from __future__ import annotations

from envoy.extensions.dynamic_modules.v3 import dynamic_modules_pb2 as dm
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _file(package: str, message: str, name_field: str) -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(
        name=f"authplane/{package.replace('.', '/')}/dynamic_modules.proto", package=package, syntax="proto3",
        dependency=[dm.DESCRIPTOR.name, any_pb2.DESCRIPTOR.name])
    m = f.message_type.add(name=message)
    m.field.add(name="dynamic_module_config", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_MESSAGE,
                type_name=".envoy.extensions.dynamic_modules.v3.DynamicModuleConfig")
    m.field.add(name=name_field, number=2, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
    m.field.add(name=name_field.replace("_name", "_config"), number=3, label=_F.LABEL_OPTIONAL,
                type=_F.TYPE_MESSAGE, type_name=".google.protobuf.Any")
    return f


def _message(package: str, message: str, name_field: str) -> type:
    pool = descriptor_pool.Default()
    full = f"{package}.{message}"
    try:
        desc = pool.FindMessageTypeByName(full)
    except KeyError:
        pool.Add(_file(package, message, name_field))
        desc = pool.FindMessageTypeByName(full)
    return message_factory.GetMessageClass(desc)


DynamicModuleAccessLog = _message("envoy.extensions.access_loggers.dynamic_modules.v3", "DynamicModuleAccessLog",
                                  "logger_name")
"""``envoy.access_loggers.dynamic_modules``: ``dynamic_module_config``, ``logger_name``, ``logger_config``."""
DynamicModuleBootstrapExtension = _message("envoy.extensions.bootstrap.dynamic_modules.v3",
                                           "DynamicModuleBootstrapExtension", "extension_name")
"""``envoy.bootstrap.dynamic_modules``: ``dynamic_module_config``, ``extension_name``, ``extension_config``."""
