"""The Envoy bootstrap of one fleet member: node identity, admin on loopback, ADS to authplane."""

from __future__ import annotations

import ipaddress
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from authplane.addresses import split_address
from authplane.compiler.ir import ClusterIR
from authplane.compiler.module_protos import DynamicModuleBootstrapExtension
from authplane.compiler.protos import ads_source, duration, pack, socket_address
from authplane.compiler.render import dump, to_dict
from authplane.compiler.resources import NATIVE_LOGGER, cluster
from authplane.compiler.tls import FLEET_CERT_SECRET
from authplane.contract import NATIVE_DECISION_LOG_PATH
from authplane.policy.modules import NATIVE_RULES

XDS_CLUSTER = "_authplane_xds"
"""Policy names start with a letter or digit, so no Backend can take this cluster name."""
MAX_DOWNSTREAM_CONNECTIONS = 50_000
NATIVE_FLUSH_MS = 200
"""How often the module's bootstrap extension sends the decisions its logger gathered."""


def native_decision_log(node_id: str, fleet: str) -> DynamicModuleBootstrapExtension:
    """The module's bootstrap extension that sends the decision log in batches: a gRPC call to
    authplane (``contract.NATIVE_DECISION_LOG_PATH``) over the xDS cluster, so with its TLS and
    fleet certificate, every ``NATIVE_FLUSH_MS``."""
    ext = DynamicModuleBootstrapExtension(extension_name=NATIVE_LOGGER)
    ext.dynamic_module_config.name = NATIVE_RULES
    config = {"cluster": XDS_CLUSTER, "authority": XDS_CLUSTER, "path": NATIVE_DECISION_LOG_PATH,
              "node": node_id, "fleet": fleet, "flush_ms": NATIVE_FLUSH_MS, "max_inflight": 2, "timeout_ms": 5000}
    ext.extension_config.CopyFrom(pack(wrappers_pb2.StringValue(
        value=json.dumps(config, sort_keys=True, separators=(",", ":")))))
    return ext


@dataclass(frozen=True)
class XdsClientTls:
    """TLS from this Envoy to authplane. Paths are Envoy's: it reads the files itself."""

    ca: str
    """Signs authplane's server certificate."""
    server_name: str
    """Sent as SNI (unless an IP address) and required among the server certificate's SANs."""
    cert: str | None = None
    key: str | None = None
    """The fleet certificate (mutual TLS) and its key."""

    def flags(self) -> list[str]:
        flags = ["--xds-ca", self.ca, "--xds-server-name", self.server_name]
        if self.cert is not None and self.key is not None:
            flags += ["--xds-client-cert", self.cert, "--xds-client-key", self.key]
        return flags


def upstream_tls(tls: XdsClientTls) -> tls_pb2.UpstreamTlsContext:
    try:
        ipaddress.ip_address(tls.server_name)
        san_type = common_pb2.SubjectAltNameMatcher.IP_ADDRESS
    except ValueError:
        san_type = common_pb2.SubjectAltNameMatcher.DNS
    ctx = tls_pb2.UpstreamTlsContext(sni=tls.server_name if san_type == common_pb2.SubjectAltNameMatcher.DNS else "")
    common = ctx.common_tls_context
    common.alpn_protocols.append("h2")
    common.validation_context.trusted_ca.filename = tls.ca
    common.validation_context.match_typed_subject_alt_names.add(
        san_type=san_type, matcher=string_pb2.StringMatcher(exact=tls.server_name))
    if tls.cert is not None and tls.key is not None:
        pair = common.tls_certificates.add()
        pair.certificate_chain.filename, pair.private_key.filename = tls.cert, tls.key
    return ctx


def xds_addresses(xds: str | Sequence[str]) -> tuple[str, ...]:
    """One address or several: the replicas of one control plane, all on the same policies."""
    found = (xds,) if isinstance(xds, str) else tuple(xds)
    if not found:
        raise ValueError("at least one xDS address is needed")
    return found


def bootstrap(node_id: str, fleet: str, xds: str | Sequence[str] = "127.0.0.1:18000", admin_port: int = 9901,
              delta: bool = True, tls: XdsClientTls | None = None,
              native_log: bool = False) -> bootstrap_pb2.Bootstrap:
    """``xds``: one authplane address, or the replicas'. They all become endpoints of the one xDS
    cluster: ADS holds a single stream, and when it breaks the reconnect is load-balanced (round
    robin) to the next endpoint, so an Envoy moves to a live replica within a back-off or two.
    ``native_log``: the module's decision-log sender (``native_decision_log``)."""
    endpoints = tuple(split_address(a) for a in xds_addresses(xds))
    boot = bootstrap_pb2.Bootstrap()
    boot.node.id = node_id
    boot.node.cluster = fleet
    boot.admin.address.CopyFrom(socket_address("127.0.0.1", admin_port))

    ads = boot.dynamic_resources.ads_config
    ads.api_type = config_source_pb2.ApiConfigSource.DELTA_GRPC if delta else config_source_pb2.ApiConfigSource.GRPC
    ads.transport_api_version = config_source_pb2.V3
    ads.set_node_on_first_message_only = True
    grpc = ads.grpc_services.add().envoy_grpc
    grpc.cluster_name = XDS_CLUSTER
    # Reconnect fast after a control-plane restart (Envoy's default backoff grows to 30 s).
    grpc.retry_policy.retry_back_off.base_interval.CopyFrom(duration(0.25))
    grpc.retry_policy.retry_back_off.max_interval.CopyFrom(duration(5))
    boot.dynamic_resources.cds_config.CopyFrom(ads_source())
    boot.dynamic_resources.lds_config.CopyFrom(ads_source())

    # an IP is a STATIC cluster, a hostname (a compose service name ...) is resolved by Envoy
    xds_cluster = cluster(ClusterIR(XDS_CLUSTER, endpoints, http2=True, connect_timeout=1.0,
                                    tls=False, sni=None, origin=None), eds=False)
    keepalive = xds_cluster.upstream_connection_options.tcp_keepalive  # notice a vanished control plane
    keepalive.keepalive_time.value, keepalive.keepalive_interval.value, keepalive.keepalive_probes.value = 30, 5, 3
    if tls is not None:
        xds_cluster.transport_socket.name = "envoy.transport_sockets.tls"
        xds_cluster.transport_socket.typed_config.CopyFrom(pack(upstream_tls(tls)))
    boot.static_resources.clusters.append(xds_cluster)
    if tls is not None and tls.cert is not None and tls.key is not None:
        # the same certificate, for the decision service when it requires one (serve --authz-client-ca)
        secret = boot.static_resources.secrets.add(name=FLEET_CERT_SECRET)
        secret.tls_certificate.certificate_chain.filename = tls.cert
        secret.tls_certificate.private_key.filename = tls.key

    monitor = boot.overload_manager.resource_monitors.add(
        name="envoy.resource_monitors.global_downstream_max_connections")
    monitor.typed_config.CopyFrom(pack(downstream_connections_pb2.DownstreamConnectionsConfig(
        max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS)))
    if native_log:
        boot.bootstrap_extensions.add(name="envoy.bootstrap.dynamic_modules").typed_config.CopyFrom(
            pack(native_decision_log(node_id, fleet)))
    return boot


def bootstrap_yaml(node_id: str, fleet: str, xds: str | Sequence[str] = "127.0.0.1:18000", admin_port: int = 9901,
                   delta: bool = True, tls: XdsClientTls | None = None, native_log: bool = False) -> str:
    command = shlex.join(["authplane", "bootstrap", "--node-id", node_id, "--fleet", fleet,
                          *(f for a in xds_addresses(xds) for f in ("--xds", a)),
                          "--admin-port", str(admin_port), "--delta" if delta else "--sotw",
                          *(tls.flags() if tls is not None else ()),
                          *(("--native-decision-log",) if native_log else ())])
    channel = "" if tls is None else " (mutual TLS)" if tls.cert else " (TLS)"
    header = (f"# Envoy bootstrap of node {node_id!r}, fleet {fleet!r}: configuration comes from authplane over "
              f"{'Delta' if delta else 'SotW'} ADS{channel}.\n# Written by: {command}\n")
    return header + dump(to_dict(bootstrap(node_id, fleet, xds, admin_port, delta, tls, native_log)))
