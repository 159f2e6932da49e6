"""Tenants: who a client is, and what it may use, from the server's side.

The tenant file (``--tenants FILE``, YAML) names every tenant: the client keys that belong to
it (certificate names in ``--curve-allowed-keys``: ``engine-a`` for ``engine-a.key``), the salt
its namespaces are made with, the models it may register, and its byte quotas. Example::

    tenants:
      - name: team-a
        keys: [engine-a, engine-a-2]
        salt: "8c3f0e..."          # default: the tenant's name
        models: [Qwen/Qwen3-14B]   # default: any model
        buffer_gb: 8               # its own shared-memory segment of this size (required)
        disk_gb: 100               # its share of --disk-path (default 0: no disk tier)
        remote_gb: 20              # bytes this node may keep in the remote tier for it
        segment: {user: 1001, group: 2001, mode: "0600"}   # owner of its segment

A session's tenant comes from its CURVE key, never from what the client says: the salt a
client claims must be its tenant's (or empty, and then the tenant's is used), a model outside
the tenant's list is refused, and each tenant's chunks live in a segment, an index and
eviction order of their own (see partition.py), so one tenant's stores never evict another's.
"""

from __future__ import annotations

import os
import re

import msgspec

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS label: safe in paths
_GB = 1 << 30


class SegmentOwner(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Owner and mode of a tenant's shared-memory segment (the server must be allowed to
    chown: root, or CAP_CHOWN). ``user``/``group``: numeric ids, None: the server's own."""

    user: int | None = None
    group: int | None = None
    mode: str = "0600"

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


class TenantSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One tenant of the tenant file; sizes in GB of 2^30 bytes."""

    name: str
    keys: list[str]
    buffer_gb: float
    salt: str = ""
    models: list[str] = []
    disk_gb: float = 0.0
    remote_gb: float = 0.0
    segment: SegmentOwner = SegmentOwner()

    @property
    def namespace_salt(self) -> str:
        """The salt every namespace of this tenant is made with."""
        return self.salt or self.name

    @property
    def buffer_bytes(self) -> int:
        return int(self.buffer_gb * _GB)

    @property
    def disk_bytes(self) -> int:
        return int(self.disk_gb * _GB)

    @property
    def remote_bytes(self) -> int:
        return int(self.remote_gb * _GB)

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models


class TenantFile(msgspec.Struct, forbid_unknown_fields=True):
    tenants: list[TenantSpec]


def parse_tenants(text: bytes | str, source: str = "the tenant file") -> list[TenantSpec]:
    """The tenants of a tenant file's YAML text. Raises ValueError naming ``source`` and the
    problem: not YAML, an unknown or mistyped field, no tenant, a bad name or mode, a size not
    above 0 (buffer) or below 0 (disk, remote), and names, salts or keys given twice."""
    try:
        spec = msgspec.yaml.decode(text, type=TenantFile)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"{source}: {exc}") from None
    if not spec.tenants:
        raise ValueError(f"{source}: no tenants")
    owners: dict[tuple[str, str], str] = {}  # (what, value) -> the tenant it belongs to

    def once(what: str, value: str, tenant: str) -> None:
        other = owners.setdefault((what, value), tenant)
        if other != tenant:
            raise ValueError(f"{source}: {what} {value!r} is given to tenants {other} and {tenant}")

    for t in spec.tenants:
        where = f"{source}: tenant {t.name!r}"
        if not _NAME.match(t.name):
            raise ValueError(f"{where}: a name is 1-63 of a-z, 0-9 and '-' (a DNS label)")
        if ("name", t.name) in owners:
            raise ValueError(f"{source}: two tenants are named {t.name!r}")
        owners[("name", t.name)] = t.name
        once("salt", t.namespace_salt, t.name)
        if not t.keys:
            raise ValueError(f"{where}: no keys (certificate names in --curve-allowed-keys)")
        for key in t.keys:
            if not key or "/" in key or key.startswith("."):
                raise ValueError(f"{where}: key {key!r} is not a certificate name")
            once("key", key, t.name)
        if not t.buffer_gb > 0:
            raise ValueError(f"{where}: buffer_gb must be above 0")
        if t.disk_gb < 0 or t.remote_gb < 0:
            raise ValueError(f"{where}: disk_gb and remote_gb cannot be negative")
        try:
            bits = t.segment.mode_bits
        except ValueError:
            raise ValueError(f"{where}: segment mode {t.segment.mode!r} is not octal") from None
        if bits & ~0o660 or not bits & 0o600 == 0o600:
            raise ValueError(f"{where}: segment mode {t.segment.mode} must give its owner read "
                             "and write, and nobody but the owner and group anything")
    return spec.tenants


def load_tenants(path: str | os.PathLike) -> list[TenantSpec]:
    """``parse_tenants`` of a file; ValueError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read the tenant file {path}: {exc}") from None
    return parse_tenants(text, str(path))


class TenantDirectory:
    """Client key (certificate name) -> tenant; built once at start."""

    def __init__(self, tenants: list[TenantSpec]):
        self.tenants = {t.name: t for t in tenants}
        self._by_key = {key: t for t in tenants for key in t.keys}

    def tenant_of(self, certificate_name: str) -> TenantSpec | None:
        return self._by_key.get(certificate_name) if certificate_name else None

    def unknown_keys(self, certificate_names: set[str]) -> list[str]:
        """Keys the file names that are not among ``certificate_names`` (sorted)."""
        return sorted(set(self._by_key) - certificate_names)
