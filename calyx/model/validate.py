"""Validation at the boundary: a typed reader over one JSON object.

Every model class builds itself from a plain ``dict`` through a :class:`Reader`, which knows the key
(or document) being read and the dotted path of the field, so that every error names both. A
reader in ``strict`` mode (user documents given to ``calyxctl``) rejects unknown fields, so typos
are caught; in lenient mode (values read from etcd, possibly written by a newer Calyx) unknown
fields are ignored, as the contract's "extend with optional fields" rule requires.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn, TypeVar

from calyx.model.errors import ModelError

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

_LABEL_KEY = re.compile(
    r"^([A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?/)?"  # optional DNS-style prefix
    r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"
)
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.:-]{0,251}[A-Za-z0-9])?$")
_IFACE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

MAX_AS = 4294967295


class Reader:
    """Typed access to the fields of one JSON object, with errors that name key and field."""

    def __init__(self, data: object, *, key: str, path: str = "", strict: bool = False) -> None:
        self.key = key
        self.path = path
        self.strict = strict
        if not isinstance(data, Mapping):
            self.fail("", f"expected an object, got {_type_name(data)}")
        self.data: Mapping[str, Any] = data
        self._seen: set[str] = set()

    # --- plumbing --------------------------------------------------------------------------------

    def field(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, message: str) -> NoReturn:
        raise ModelError(self.key, self.field(name) if name else self.path, message)

    def has(self, name: str) -> bool:
        self._seen.add(name)
        return self.data.get(name) is not None

    def raw(self, name: str) -> Any:
        self._seen.add(name)
        return self.data.get(name)

    def done(self) -> None:
        """In strict mode, reject fields nobody asked for (typos in user documents)."""
        if not self.strict:
            return
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            self.fail(unknown[0], "unknown field")

    def sub(self, name: str) -> Reader | None:
        value = self.raw(name)
        if value is None:
            return None
        return Reader(value, key=self.key, path=self.field(name), strict=self.strict)

    def items(self, name: str) -> Iterator[tuple[str, Any]]:
        """Yield (field path, element) of a list field (absent → nothing)."""
        value = self.raw(name)
        if value is None:
            return
        if not isinstance(value, list):
            self.fail(name, f"expected a list, got {_type_name(value)}")
        for i, item in enumerate(value):
            yield f"{name}[{i}]", item

    def sub_at(self, path: str, value: object) -> Reader:
        full = f"{self.path}.{path}" if self.path else path
        return Reader(value, key=self.key, path=full, strict=self.strict)

    # --- scalar accessors ------------------------------------------------------------------------

    def str_(self, name: str, default: str | None = None, *, required: bool = False,
             pattern: re.Pattern[str] | None = None, what: str = "") -> str | None:
        value = self.raw(name)
        if value is None:
            if required:
                self.fail(name, "required")
            return default
        if not isinstance(value, str):
            self.fail(name, f"expected a string, got {_type_name(value)}")
        if pattern is not None and not pattern.match(value):
            self.fail(name, f"{value!r} is not a valid {what or 'value'}")
        return value

    def req_str(self, name: str, *, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        value = self.str_(name, required=True, pattern=pattern, what=what)
        assert value is not None
        return value

    def bool_(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(name, f"expected true or false, got {value!r}")
        return value

    def int_(self, name: str, default: int | None = None, *, lo: int | None = None,
             hi: int | None = None, required: bool = False) -> int | None:
        value = self.raw(name)
        if value is None:
            if required:
                self.fail(name, "required")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            else:
                self.fail(name, f"expected an integer, got {value!r}")
        if lo is not None and value < lo:
            self.fail(name, f"{value} is below the minimum {lo}")
        if hi is not None and value > hi:
            self.fail(name, f"{value} is above the maximum {hi}")
        return value

    def number(self, name: str, default: float | None = None) -> float | None:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(name, f"expected a number, got {value!r}")
        return float(value)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(name, f"expected one of {', '.join(choices)}, got {value!r}")
        for c in choices:
            if value.lower() == c.lower():
                return c
        self.fail(name, f"{value!r} is not one of {', '.join(choices)}")

    def as_number(self, name: str, default: int | None = None, *, required: bool = False) -> int | None:
        """A 4-byte AS number, as an integer or in asdot notation (``1.10``)."""
        value = self.raw(name)
        if isinstance(value, str) and "." in value:
            hi_s, _, lo_s = value.partition(".")
            if hi_s.isdigit() and lo_s.isdigit() and int(hi_s) < 65536 and int(lo_s) < 65536:
                return int(hi_s) * 65536 + int(lo_s)
            self.fail(name, f"{value!r} is not an AS number")
        return self.int_(name, default, lo=1, hi=MAX_AS, required=required)

    def labels(self, name: str) -> dict[str, str]:
        value = self.raw(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(name, f"expected an object of label: value, got {_type_name(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            err = label_error(k, v)
            if err:
                self.fail(f"{name}.{k}", err)
            out[k] = v
        return out

    def str_map(self, name: str) -> dict[str, str]:
        """An object of string → string (absent → empty)."""
        value = self.raw(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(name, f"expected an object of string: string, got {_type_name(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(v, str):
                self.fail(f"{name}.{k}", f"expected a string, got {_type_name(v)}")
            out[str(k)] = v
        return out

    def str_list(self, name: str, *, pattern: re.Pattern[str] | None = None, what: str = "") -> tuple[str, ...]:
        out = []
        for path, item in self.items(name):
            if not isinstance(item, str):
                self.fail(path, f"expected a string, got {_type_name(item)}")
            if pattern is not None and not pattern.match(item):
                self.fail(path, f"{item!r} is not a valid {what or 'value'}")
            out.append(item)
        return tuple(out)

    def parsed(self, name: str, parse: Callable[[str], T], what: str, *, required: bool = False) -> T | None:
        value = self.raw(name)
        if value is None:
            if required:
                self.fail(name, "required")
            return None
        if not isinstance(value, str):
            self.fail(name, f"expected a {what} as a string, got {_type_name(value)}")
        try:
            return parse(value)
        except ValueError as exc:
            self.fail(name, f"{value!r} is not a valid {what}: {exc}")

    def parsed_list(self, name: str, parse: Callable[[str], T], what: str) -> tuple[T, ...]:
        out: list[T] = []
        for path, item in self.items(name):
            if not isinstance(item, str):
                self.fail(path, f"expected a {what} as a string, got {_type_name(item)}")
            try:
                out.append(parse(item))
            except ValueError as exc:
                self.fail(path, f"{item!r} is not a valid {what}: {exc}")
        return tuple(out)


def label_error(name: object, value: object) -> str | None:
    """Why ``name: value`` is not a valid label, or None."""
    if not isinstance(name, str) or not _LABEL_KEY.match(name):
        return f"{name!r} is not a valid label name"
    if not isinstance(value, str):
        return f"label values must be strings, got {_type_name(value)}"
    if len(value) > 256:
        return "label value longer than 256 characters"
    return None


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def parse_network(text: str) -> IPNetwork:
    """A CIDR; host bits must be zero (``10.0.0.1/24`` is refused: say ``10.0.0.0/24``)."""
    return ipaddress.ip_network(text.strip(), strict=True)


def parse_host_net(text: str) -> IPNetwork:
    """A single address as a network: ``10.0.0.5`` or ``10.0.0.5/32`` (IPv6: ``/128``)."""
    net = ipaddress.ip_network(text.strip(), strict=True)
    if net.num_addresses != 1:
        raise ValueError("must be a single address (/32 or /128)")
    return net


def parse_address(text: str) -> IPAddress:
    return ipaddress.ip_address(text.strip())


def parse_interface(text: str) -> IPInterface:
    """An address with its subnet's prefix length (``10.0.1.11/24``)."""
    if "/" not in text:
        raise ValueError("give the address with its prefix length, e.g. 10.0.1.11/24")
    return ipaddress.ip_interface(text.strip())


def parse_router_id(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text.strip())


def parse_mac(text: str) -> str:
    mac = text.strip().lower()
    if not _MAC.match(mac):
        raise ValueError("expected six hex octets separated by ':'")
    return mac


NAME_RE = _NAME
IFACE_RE = _IFACE
LABEL_KEY_RE = _LABEL_KEY
