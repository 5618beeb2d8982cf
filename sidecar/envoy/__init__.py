"""Envoy adapters: ext_authz over HTTP and gRPC, and the access-log completion stream.

Each adapter converts the wire format to the core's types, calls `AdmissionService`, and
converts the decision back. Nothing here decides anything.
"""
