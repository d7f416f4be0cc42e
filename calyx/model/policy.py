"""Network policy: rules, profiles and ordered policies.

A rule matches on protocol, ICMP type/code, and source/destination nets, selectors and ports
(each with a negated form), and takes an action: ``allow``, ``deny``, ``log`` or ``pass`` (skip the
remaining policies and go to the endpoint's profiles). A workload with no profile and no policy
that allows its traffic gets none (default deny).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from calyx.model.resources import validate_selector
from calyx.model.validate import IPNetwork, Reader, parse_network

ACTIONS = ("allow", "deny", "log", "pass")
PROTOCOL_NAMES = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "udplite": 136}
PORT_PROTOCOLS = {6, 17, 132, 136}
POLICY_TYPES = ("ingress", "egress")


@dataclass(frozen=True, slots=True)
class PortRange:
    """A port or an inclusive range ``lo:hi``."""

    lo: int
    hi: int

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"

    @classmethod
    def parse(cls, value: object) -> PortRange:
        if isinstance(value, bool):
            raise ValueError("expected a port number or 'lo:hi'")
        if isinstance(value, int):
            lo = hi = value
        elif isinstance(value, str):
            text = value.strip()
            a, sep, b = text.partition(":")
            if not a.isdigit() or (sep and not b.isdigit()):
                raise ValueError("expected a port number or 'lo:hi'")
            lo, hi = int(a), int(b) if sep else int(a)
        else:
            raise ValueError("expected a port number or 'lo:hi'")
        if not (0 <= lo <= 65535 and 0 <= hi <= 65535):
            raise ValueError("ports are 0 to 65535")
        if lo > hi:
            raise ValueError(f"range {lo}:{hi} is reversed")
        return cls(lo, hi)

    def to_json(self) -> int | str:
        return self.lo if self.lo == self.hi else f"{self.lo}:{self.hi}"


@dataclass(frozen=True, slots=True)
class IcmpMatch:
    type: int
    code: int | None = None

    def to_dict(self) -> dict[str, int]:
        d = {"type": self.type}
        if self.code is not None:
            d["code"] = self.code
        return d


@dataclass(frozen=True, slots=True)
class EntityRule:
    """The source or destination side of a rule."""

    nets: tuple[IPNetwork, ...] = ()
    not_nets: tuple[IPNetwork, ...] = ()
    selector: str | None = None
    not_selector: str | None = None
    ports: tuple[PortRange, ...] = ()
    not_ports: tuple[PortRange, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.nets or self.not_nets or self.selector or self.not_selector or self.ports
                    or self.not_ports)

    @classmethod
    def read(cls, r: Reader | None) -> EntityRule:
        if r is None:
            return cls()
        obj = cls(
            nets=r.parsed_list("nets", parse_network, "CIDR"),
            not_nets=r.parsed_list("not_nets", parse_network, "CIDR"),
            selector=r.parsed("selector", validate_selector, "selector"),
            not_selector=r.parsed("not_selector", validate_selector, "selector"),
            ports=_ports(r, "ports"),
            not_ports=_ports(r, "not_ports"),
        )
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.nets:
            d["nets"] = [str(n) for n in self.nets]
        if self.not_nets:
            d["not_nets"] = [str(n) for n in self.not_nets]
        if self.selector is not None:
            d["selector"] = self.selector
        if self.not_selector is not None:
            d["not_selector"] = self.not_selector
        if self.ports:
            d["ports"] = [p.to_json() for p in self.ports]
        if self.not_ports:
            d["not_ports"] = [p.to_json() for p in self.not_ports]
        return d


def _ports(r: Reader, name: str) -> tuple[PortRange, ...]:
    out = []
    for path, item in r.items(name):
        try:
            out.append(PortRange.parse(item))
        except ValueError as exc:
            r.fail(path, f"{item!r}: {exc}")
    return tuple(out)


def _protocol(r: Reader, name: str) -> int | str | None:
    value = r.raw(name)
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in PROTOCOL_NAMES:
        return value.lower()
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 255:
        return value
    if isinstance(value, str) and value.isdigit() and 1 <= int(value) <= 255:
        return int(value)
    r.fail(name, f"{value!r} is not a protocol (tcp, udp, icmp, icmpv6, sctp, udplite or 1-255)")


def protocol_number(proto: int | str | None) -> int | None:
    if proto is None:
        return None
    return proto if isinstance(proto, int) else PROTOCOL_NAMES[proto]


def _icmp(r: Reader, name: str) -> IcmpMatch | None:
    sub = r.sub(name)
    if sub is None:
        return None
    t = sub.int_("type", lo=0, hi=254, required=True)
    c = sub.int_("code", lo=0, hi=255)
    sub.done()
    assert t is not None
    return IcmpMatch(t, c)


@dataclass(frozen=True, slots=True)
class Rule:
    action: str
    protocol: int | str | None = None
    not_protocol: int | str | None = None
    icmp: IcmpMatch | None = None
    not_icmp: IcmpMatch | None = None
    ip_version: int | None = None
    source: EntityRule = field(default_factory=EntityRule)
    destination: EntityRule = field(default_factory=EntityRule)

    @classmethod
    def read(cls, r: Reader) -> Rule:
        action = r.choice("action", ACTIONS, "")
        if not action:
            r.fail("action", f"required: one of {', '.join(ACTIONS)}")
        protocol = _protocol(r, "protocol")
        rule = cls(
            action=action,
            protocol=protocol,
            not_protocol=_protocol(r, "not_protocol"),
            icmp=_icmp(r, "icmp"),
            not_icmp=_icmp(r, "not_icmp"),
            ip_version=r.int_("ip_version", lo=4, hi=6),
            source=EntityRule.read(r.sub("source")),
            destination=EntityRule.read(r.sub("destination")),
        )
        if rule.ip_version not in (None, 4, 6):
            r.fail("ip_version", "must be 4 or 6")
        pnum = protocol_number(protocol)
        for side in ("source", "destination"):
            ent: EntityRule = getattr(rule, side)
            if (ent.ports or ent.not_ports) and pnum not in PORT_PROTOCOLS:
                r.fail(f"{side}.ports", "ports need protocol tcp, udp, sctp or udplite")
        if (rule.icmp or rule.not_icmp) and pnum not in (1, 58):
            r.fail("icmp", "an ICMP match needs protocol icmp or icmpv6")
        r.done()
        return rule

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"action": self.action}
        if self.protocol is not None:
            d["protocol"] = self.protocol
        if self.not_protocol is not None:
            d["not_protocol"] = self.not_protocol
        if self.icmp is not None:
            d["icmp"] = self.icmp.to_dict()
        if self.not_icmp is not None:
            d["not_icmp"] = self.not_icmp.to_dict()
        if self.ip_version is not None:
            d["ip_version"] = self.ip_version
        if not self.source.empty:
            d["source"] = self.source.to_dict()
        if not self.destination.empty:
            d["destination"] = self.destination.to_dict()
        return d


def _rules(r: Reader, name: str) -> tuple[Rule, ...]:
    return tuple(Rule.read(r.sub_at(path, item)) for path, item in r.items(name))


@dataclass(frozen=True, slots=True)
class Profile:
    """``/calyx/v1/policy/profiles/<name>``: rules and labels shared by the endpoints naming it."""

    name: str
    labels_to_apply: dict[str, str] = field(default_factory=dict)
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    @classmethod
    def from_dict(cls, data: object, *, key: str, name: str, strict: bool = False) -> Profile:
        r = Reader(data, key=key, strict=strict)
        obj = cls(name=name, labels_to_apply=r.labels("labels_to_apply"), ingress=_rules(r, "ingress"),
                  egress=_rules(r, "egress"))
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels_to_apply": dict(self.labels_to_apply),
            "ingress": [x.to_dict() for x in self.ingress],
            "egress": [x.to_dict() for x in self.egress],
        }


@dataclass(frozen=True, slots=True)
class Policy:
    """``/calyx/v1/policy/policies/<name>``: ordered rules for the endpoints its selector picks.

    Policies apply in ascending ``order`` (no order = after every ordered one; ties by name).
    ``types`` says which directions the policy governs; by default ingress, plus egress when it has
    egress rules (Calico's defaulting). An endpoint governed by a policy in a direction gets that
    direction's traffic only when some rule allows it.
    """

    name: str
    order: float | None = None
    selector: str = "all()"
    types: tuple[str, ...] = ("ingress",)
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    @classmethod
    def from_dict(cls, data: object, *, key: str, name: str, strict: bool = False) -> Policy:
        r = Reader(data, key=key, strict=strict)
        ingress = _rules(r, "ingress")
        egress = _rules(r, "egress")
        types: tuple[str, ...]
        if r.has("types"):
            types = r.str_list("types")
            for i, t in enumerate(types):
                if t.lower() not in POLICY_TYPES:
                    r.fail(f"types[{i}]", f"{t!r} is not ingress or egress")
            types = tuple(dict.fromkeys(t.lower() for t in types))
        else:
            types = ("ingress", "egress") if egress else ("ingress",)
        obj = cls(
            name=name,
            order=r.number("order"),
            selector=r.parsed("selector", validate_selector, "selector") or "all()",
            types=types,
            ingress=ingress,
            egress=egress,
        )
        r.done()
        return obj

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.order is not None:
            d["order"] = int(self.order) if self.order == int(self.order) else self.order
        d["selector"] = self.selector
        d["types"] = list(self.types)
        d["ingress"] = [x.to_dict() for x in self.ingress]
        d["egress"] = [x.to_dict() for x in self.egress]
        return d

    @property
    def sort_key(self) -> tuple[float, str]:
        return (self.order if self.order is not None else float("inf"), self.name)
