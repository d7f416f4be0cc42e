"""Pure rendering of felix's iptables chains: model in, chains of (match, target) rules out.

What it owns: the *shape* of every chain felix programs and the names of those chains and of the
ipsets they reference. Nothing here does I/O; the iptables driver (``felix/iptables.py``) adds the
``calyx:<hash>`` comment to every rule and decides what to write.

The filter table (one rendering per IP version)::

    FORWARD ─► calyx-FORWARD          INPUT ─► calyx-INPUT           OUTPUT ─► calyx-OUTPUT
      -i cali+ / -o cali+: INVALID → DROP, ESTABLISHED,RELATED → ACCEPT (the fast path)
      clear our mark bits; -i cali+ → calyx-from-wl-dispatch (egress policy of the sender)
      clear;               -o cali+ → calyx-to-wl-dispatch   (ingress policy of the receiver)
      -i cali+ / -o cali+ → ACCEPT (both dispatches returned: allowed)

    calyx-from-wl-dispatch: -i <iface> -s <its address> -g calyx-fw-<iface> ... (two levels: grouped
      by the first six characters of the name), and a final DROP: an unknown ``cali*`` interface, or
      a source address that is not the endpoint's (anti-spoofing), is dropped (fail closed). These
      rules stay in the kernel when felix stops: felix never cleans up on exit.
    calyx-to-wl-dispatch: the same by ``-o <iface>``.

    calyx-fw-<iface> (from workload): each egress policy in order (``calyx-po-<id>``),
      end-of-policies DROP unless a policy said ``pass``, then each profile (``calyx-pro-<id>``),
      then DROP unless accepted (default deny).
    calyx-tw-<iface> (to workload): the same with ingress policies/profiles.
    An endpoint with no address of an IP version gets no chains in that version's table.

Policy and profile chains mark the packet: ``allow`` sets :data:`MARK_ACCEPT` and returns, ``pass``
sets :data:`MARK_PASS` and returns, ``deny`` drops, ``log`` logs and goes on. Endpoint chains return
(to the hook chain) when the accept bit is set, and drop otherwise.

The nat table (IPv4): ``POSTROUTING ─► calyx-POSTROUTING``: MASQUERADE when the source is in a pool
with ``nat_outgoing`` (ipset ``calyx4-natpools``) and the destination is in no pool
(``calyx4-allpools``).

Names: chains ``calyx-…`` of at most 28 characters; names that would be longer, or that hold
characters iptables dislikes, are replaced by ``_`` and a hash. ipsets ``calyx4-…``/``calyx6-…`` of
at most 31 characters: ``calyx4-s<selector unique_id>`` for selectors (cluster-wide members),
``calyx4-n<hash>`` for lists of nets in rules.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from calyx import selector as selectors
from calyx.model import EntityRule, Policy, PortRange, Profile, Rule
from calyx.model.policy import protocol_number

IptRule = tuple[str, str]
"""One rule: (match, target). The driver renders ``-A chain <match> -m comment ... <target>``."""

CHAIN_PREFIX = "calyx-"
MAX_CHAIN = 28
MAX_IPSET = 31
WORKLOAD_PREFIX = "cali"
MARK_ACCEPT = 0x10000
MARK_PASS = 0x20000
MARK_ALL = MARK_ACCEPT | MARK_PASS
DISPATCH_GROUP = 6  # dispatch chains group interfaces by this many leading characters

FORWARD = "calyx-FORWARD"
INPUT = "calyx-INPUT"
OUTPUT = "calyx-OUTPUT"
POSTROUTING = "calyx-POSTROUTING"
FROM_DISPATCH = "calyx-from-wl-dispatch"
TO_DISPATCH = "calyx-to-wl-dispatch"
NAT_POOLS = "natpools"
ALL_POOLS = "allpools"
ALL_HOSTS = "all-hosts"  # every node's IPv4 address: the only accepted sources of tunnel traffic
VXLAN_PORT = 4789

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MULTIPORT_SLOTS = 15

_IS_ACCEPTED = f"-m mark --mark {MARK_ACCEPT:#x}/{MARK_ACCEPT:#x}"
_IS_PASSED = f"-m mark --mark {MARK_PASS:#x}/{MARK_PASS:#x}"
_NOT_PASSED = f"-m mark --mark 0x0/{MARK_PASS:#x}"
_CLEAR = f"-j MARK --set-xmark 0x0/{MARK_ALL:#x}"


def short_hash(text: str, length: int = 16) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def _id(name: str, room: int) -> str:
    """``name`` if it fits in ``room`` characters and is safe in a chain name, else ``_`` + hash."""
    if len(name) <= room and _SAFE.match(name):
        return name
    return "_" + short_hash(name, room - 1)


@functools.lru_cache(maxsize=65536)
def policy_chain(name: str, direction: str) -> str:
    """``calyx-pi-<id>`` (ingress) or ``calyx-po-<id>`` (egress)."""
    return f"calyx-p{'i' if direction == 'ingress' else 'o'}-{_id(name, MAX_CHAIN - 9)}"


@functools.lru_cache(maxsize=65536)
def profile_chain(name: str, direction: str) -> str:
    """``calyx-pri-<id>`` (ingress) or ``calyx-pro-<id>`` (egress)."""
    return f"calyx-pr{'i' if direction == 'ingress' else 'o'}-{_id(name, MAX_CHAIN - 10)}"


def to_wl_chain(iface: str) -> str:
    return f"calyx-tw-{iface}"


def from_wl_chain(iface: str) -> str:
    return f"calyx-fw-{iface}"


def ipset_name(set_id: str, version: int) -> str:
    """The kernel name of a rule ipset: ``calyx4-<id>`` / ``calyx6-<id>``."""
    return f"calyx{version}-{set_id}"


def selector_set_id(sel: str) -> str:
    return "s" + selectors.parse(sel).unique_id


def nets_set_id(nets: Iterable[object]) -> str:
    return "n" + short_hash(",".join(sorted(str(n) for n in nets)))


def member_text(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """How ``ipset save`` spells a member: a bare address for a host network, else ``a/len``."""
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


# --- which ipsets a rule needs -------------------------------------------------------------------


def _nets_need_set(nets: Sequence[object]) -> bool:
    return len(nets) > 1


def rule_set_ids(rule: Rule) -> dict[str, tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]]:
    """The rule ipsets ``rule`` references: id → ("selector", (selector text,)) or ("nets", nets).

    The same decisions as :func:`render_rule`: a selector always needs a set; a list of more than one
    net needs one; ``not_nets`` always use one (``! -s`` cannot be combined with ``-s``).
    """
    out: dict[str, tuple[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]] = {}
    for ent in (rule.source, rule.destination):
        for sel in (ent.selector, ent.not_selector):
            if sel is not None:
                out[selector_set_id(sel)] = ("selector", ())
        if _nets_need_set(ent.nets):
            out[nets_set_id(ent.nets)] = ("nets", ent.nets)
        if ent.not_nets:
            out[nets_set_id(ent.not_nets)] = ("nets", ent.not_nets)
    return out


def selector_texts(rule: Rule) -> list[str]:
    return [s for ent in (rule.source, rule.destination) for s in (ent.selector, ent.not_selector) if s is not None]


# --- rule rendering --------------------------------------------------------------------------------


def _proto_name(p: int, version: int) -> str:
    return {6: "tcp", 17: "udp", 132: "sctp", 136: "udplite"}.get(p, "icmp" if p == 1 else
                                                                 "ipv6-icmp" if p == 58 else str(p))


def _port_chunks(ports: Sequence[PortRange]) -> list[str]:
    """multiport takes 15 slots; a range takes two."""
    chunks: list[str] = []
    cur: list[str] = []
    used = 0
    for p in ports:
        cost = 1 if p.lo == p.hi else 2
        if used + cost > _MULTIPORT_SLOTS:
            chunks.append(",".join(cur))
            cur, used = [], 0
        cur.append(str(p))
        used += cost
    if cur:
        chunks.append(",".join(cur))
    return chunks


def _entity(ent: EntityRule, side: str, version: int) -> list[str] | None:
    """Match fragments for one side (``src``/``dst``), or None when it can never match this family.

    Returns a list of alternatives only for ports (multiport chunks are ORed); everything else is
    one conjunction, returned as the single first element's prefix.
    """
    flag = "-s" if side == "src" else "-d"
    parts: list[str] = []
    nets = [n for n in ent.nets if n.version == version]
    if ent.nets and not nets:
        return None
    if _nets_need_set(ent.nets):
        parts.append(f"-m set --match-set {ipset_name(nets_set_id(ent.nets), version)} {side}")
    elif nets:
        parts.append(f"{flag} {nets[0]}")
    if ent.not_nets:
        parts.append(f"-m set ! --match-set {ipset_name(nets_set_id(ent.not_nets), version)} {side}")
    if ent.selector is not None:
        parts.append(f"-m set --match-set {ipset_name(selector_set_id(ent.selector), version)} {side}")
    if ent.not_selector is not None:
        parts.append(f"-m set ! --match-set {ipset_name(selector_set_id(ent.not_selector), version)} {side}")
    pflag = "--sports" if side == "src" else "--dports"
    for chunk in _port_chunks(ent.not_ports):
        parts.append(f"-m multiport ! {pflag} {chunk}")
    return parts


def rule_matches(rule: Rule, version: int) -> list[str]:
    """The match strings of ``rule`` for one IP version (several when port lists are split; none
    when the rule cannot apply to this version)."""
    if rule.ip_version is not None and rule.ip_version != version:
        return []
    head: list[str] = []
    proto = protocol_number(rule.protocol)
    not_proto = protocol_number(rule.not_protocol)
    if proto is not None:
        if (proto == 1 and version == 6) or (proto == 58 and version == 4):
            return []
        if not_proto == proto:
            return []
        head.append(f"-p {_proto_name(proto, version)}")
    elif not_proto is not None:
        head.append(f"! -p {_proto_name(not_proto, version)}")
    src = _entity(rule.source, "src", version)
    dst = _entity(rule.destination, "dst", version)
    if src is None or dst is None:
        return []
    head += src + dst
    icmp_mod, icmp_opt = ("icmp", "--icmp-type") if version == 4 else ("icmp6", "--icmpv6-type")
    for m, neg in ((rule.icmp, ""), (rule.not_icmp, "! ")):
        if m is not None:
            spec = str(m.type) if m.code is None else f"{m.type}/{m.code}"
            head.append(f"-m {icmp_mod} {neg}{icmp_opt} {spec}")
    alternatives = [""]
    for ports, flag in ((rule.source.ports, "--sports"), (rule.destination.ports, "--dports")):
        if ports:
            chunks = _port_chunks(ports)
            alternatives = [f"{a} -m multiport {flag} {c}".strip() for a in alternatives for c in chunks]
    base = " ".join(head)
    return [f"{base} {a}".strip() for a in alternatives]


def render_rules(rules: Sequence[Rule], version: int, chain: str) -> list[IptRule]:
    out: list[IptRule] = []
    for rule in rules:
        for match in rule_matches(rule, version):
            if rule.action == "allow":
                out.append((match, f"-j MARK --set-xmark {MARK_ACCEPT:#x}/{MARK_ACCEPT:#x}"))
                out.append((_IS_ACCEPTED, "-j RETURN"))
            elif rule.action == "deny":
                out.append((match, "-j DROP"))
            elif rule.action == "pass":
                out.append((match, f"-j MARK --set-xmark {MARK_PASS:#x}/{MARK_PASS:#x}"))
                out.append((_IS_PASSED, "-j RETURN"))
            else:  # log
                prefix = chain[:27] + ": "
                out.append((match, f'-j LOG --log-prefix "{prefix}"'))
    return out


def policy_chains(policy: Policy, version: int) -> dict[str, list[IptRule]]:
    """The chains of a policy for the directions it governs."""
    out: dict[str, list[IptRule]] = {}
    for direction, rules in (("ingress", policy.ingress), ("egress", policy.egress)):
        if direction in policy.types:
            name = policy_chain(policy.name, direction)
            out[name] = render_rules(rules, version, name)
    return out


def profile_chains(profile: Profile, version: int) -> dict[str, list[IptRule]]:
    out: dict[str, list[IptRule]] = {}
    for direction, rules in (("ingress", profile.ingress), ("egress", profile.egress)):
        name = profile_chain(profile.name, direction)
        out[name] = render_rules(rules, version, name)
    return out


# --- endpoints ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    """What felix programs for one local endpoint (computed by ``felix/calc.py``)."""

    key: str
    iface: str
    ipv4_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    ipv6_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    ingress_policies: tuple[str, ...]
    egress_policies: tuple[str, ...]
    profiles: tuple[str, ...]  # profiles that exist, in the endpoint's order


@functools.lru_cache(maxsize=16384)
def _policy_block(names: tuple[str, ...], direction: str, profiles: tuple[str, ...]) -> tuple[IptRule, ...]:
    """The policy and profile part of an endpoint chain (shared by every endpoint with the same lists).

    After each policy or profile: return if it accepted. After the policies: drop unless one said
    ``pass`` (only needed when profiles follow). At the end: drop unless accepted; falling off the end
    of the chain is the accepted case (the caller continues, as after a RETURN).
    """
    out: list[IptRule] = []
    jumps: list[IptRule] = [(_NOT_PASSED, f"-j {policy_chain(n, direction)}") for n in names]
    if names and profiles:
        for jump in jumps:
            out += [jump, (_IS_ACCEPTED, "-j RETURN")]
        out.append((_NOT_PASSED, "-j DROP"))  # governed by policy, nothing allowed or passed
        jumps = []
    jumps += [("", f"-j {profile_chain(n, direction)}") for n in profiles]
    for i, jump in enumerate(jumps):
        out.append(jump)
        if i < len(jumps) - 1:
            out.append((_IS_ACCEPTED, "-j RETURN"))
    out.append((f"-m mark --mark 0x0/{MARK_ACCEPT:#x}", "-j DROP"))  # default deny
    return tuple(out)


def endpoint_chains(plan: EndpointPlan, version: int) -> dict[str, tuple[IptRule, ...]]:
    """``calyx-tw-<iface>`` (to the workload: ingress) and ``calyx-fw-<iface>`` (from it: egress) for one
    endpoint. Each is a block shared (the same tuple) by every endpoint with the same policies and
    profiles, so rendering 10,000 endpoints renders a few hundred distinct chains. Anti-spoofing is not
    here: the dispatch rule that leads to ``calyx-fw-<iface>`` matches the endpoint's source addresses
    (:func:`dispatch_group_chains`)."""
    del version  # the same for both IP versions (the policy chains differ)
    return {
        to_wl_chain(plan.iface): _policy_block(plan.ingress_policies, "ingress", plan.profiles),
        from_wl_chain(plan.iface): _policy_block(plan.egress_policies, "egress", plan.profiles),
    }


Sources = Mapping[str, Sequence[object]]
"""Interface → the endpoint's addresses of one IP version (its allowed sources)."""


def dispatch_group(iface: str) -> str | None:
    """The dispatch group of an interface (its first characters), None for a short name."""
    return iface[:DISPATCH_GROUP] if len(iface) > DISPATCH_GROUP else None


def _group_chain(short: str, prefix: str) -> str:
    return f"calyx-{short}-{_id(prefix, MAX_CHAIN - 9)}"


def _from_rules(sources: Sources) -> list[IptRule]:
    """``-i <iface> -s <address> -g calyx-fw-<iface>``: a packet from a workload is only dispatched to
    its policy when its source is one of the endpoint's addresses (anti-spoofing); anything else
    falls to the chain's final DROP."""
    return [(f"-i {i} -s {n}", f"-g {from_wl_chain(i)}") for i in sorted(sources) for n in sources[i]]


def dispatch_group_chains(prefix: str, sources: Sources) -> dict[str, list[IptRule]]:
    """The second-level dispatch chains of one group (from- and to-workload), each ending in DROP."""
    return {
        _group_chain("fd", prefix): [*_from_rules(sources), ("", "-j DROP")],
        _group_chain("td", prefix): [(f"-o {i}", f"-g {to_wl_chain(i)}") for i in sorted(sources)] + [("", "-j DROP")],
    }


def dispatch_root_chains(direct: Sources, prefixes: Iterable[str]) -> dict[str, list[IptRule]]:
    """The dispatch roots: short names directly, groups by ``<prefix>+``, then DROP (fail closed:
    an interface we do not know, or a source address that is not the endpoint's)."""
    groups = sorted(set(prefixes))
    return {
        FROM_DISPATCH: [*_from_rules(direct), *((f"-i {p}+", f"-g {_group_chain('fd', p)}") for p in groups),
                        ("", "-j DROP")],
        TO_DISPATCH: [*((f"-o {i}", f"-g {to_wl_chain(i)}") for i in sorted(direct)),
                      *((f"-o {p}+", f"-g {_group_chain('td', p)}") for p in groups), ("", "-j DROP")],
    }


def dispatch_chains(sources: Sources) -> dict[str, list[IptRule]]:
    """The whole dispatch tree for a set of interfaces (roots plus one pair of chains per group)."""
    direct: dict[str, Sequence[object]] = {}
    groups: dict[str, dict[str, Sequence[object]]] = {}
    for iface, nets in sources.items():
        g = dispatch_group(iface)
        if g is None:
            direct[iface] = nets
        else:
            groups.setdefault(g, {})[iface] = nets
    out = dispatch_root_chains(direct, groups)
    for prefix, members in groups.items():
        out.update(dispatch_group_chains(prefix, members))
    return out


def tunnel_input_rules(*, ipip: bool, vxlan: bool) -> list[IptRule]:
    """IPv4 INPUT: IP-in-IP (protocol 4) and VXLAN (UDP 4789) accepted only from cluster nodes'
    addresses (ipset ``calyx4-all-hosts``), dropped from anyone else (nothing when no tunnel is in use)."""
    hosts = f"-m set --match-set {ipset_name(ALL_HOSTS, 4)} src"
    out: list[IptRule] = []
    if ipip:
        out += [(f"-p 4 {hosts}", "-j ACCEPT"), ("-p 4", "-j DROP")]
    if vxlan:
        out += [(f"-p udp -m udp --dport {VXLAN_PORT} {hosts} -m addrtype --dst-type LOCAL", "-j ACCEPT"),
                (f"-p udp -m udp --dport {VXLAN_PORT}", "-j DROP")]
    return out


def hook_chains(version: int, *, ipip: bool = False, vxlan: bool = False) -> dict[str, list[IptRule]]:
    """calyx-FORWARD, calyx-INPUT, calyx-OUTPUT (filter table); with ``ipip``/``vxlan`` (IPv4), the
    INPUT chain starts with :func:`tunnel_input_rules`."""
    wl = WORKLOAD_PREFIX + "+"
    fwd: list[IptRule] = []
    for d in ("-i", "-o"):
        fwd.append((f"{d} {wl} -m conntrack --ctstate INVALID", "-j DROP"))
    for d in ("-i", "-o"):
        fwd.append((f"{d} {wl} -m conntrack --ctstate RELATED,ESTABLISHED", "-j ACCEPT"))
    fwd += [
        (f"-i {wl}", _CLEAR),
        (f"-i {wl}", f"-j {FROM_DISPATCH}"),
        (f"-o {wl}", _CLEAR),
        (f"-o {wl}", f"-j {TO_DISPATCH}"),
        (f"-i {wl}", "-j ACCEPT"),
        (f"-o {wl}", "-j ACCEPT"),
    ]
    inp: list[IptRule] = tunnel_input_rules(ipip=ipip, vxlan=vxlan) if version == 4 else []
    inp += [
        (f"-i {wl} -m conntrack --ctstate INVALID", "-j DROP"),
        (f"-i {wl} -m conntrack --ctstate RELATED,ESTABLISHED", "-j ACCEPT"),
    ]
    if version == 6:  # neighbour discovery and router solicitation to the host
        for t in (130, 131, 132, 133, 135, 136):
            inp.append((f"-i {wl} -p ipv6-icmp -m icmp6 --icmpv6-type {t}", "-j ACCEPT"))
    inp += [(f"-i {wl}", _CLEAR), (f"-i {wl}", f"-j {FROM_DISPATCH}"), (f"-i {wl}", "-j ACCEPT")]
    out: list[IptRule] = [
        (f"-o {wl} -m conntrack --ctstate INVALID", "-j DROP"),
        (f"-o {wl} -m conntrack --ctstate RELATED,ESTABLISHED", "-j ACCEPT"),
    ]
    if version == 6:
        for t in (130, 131, 132, 134, 135, 136):
            out.append((f"-o {wl} -p ipv6-icmp -m icmp6 --icmpv6-type {t}", "-j ACCEPT"))
    out += [(f"-o {wl}", _CLEAR), (f"-o {wl}", f"-j {TO_DISPATCH}"), (f"-o {wl}", "-j ACCEPT")]
    return {FORWARD: fwd, INPUT: inp, OUTPUT: out}


FILTER_HOOKS: dict[str, list[IptRule]] = {
    "FORWARD": [("", f"-j {FORWARD}")],
    "INPUT": [("", f"-j {INPUT}")],
    "OUTPUT": [("", f"-j {OUTPUT}")],
}
NAT_HOOKS: dict[str, list[IptRule]] = {"POSTROUTING": [("", f"-j {POSTROUTING}")]}


def nat_chains() -> dict[str, list[IptRule]]:
    """calyx-POSTROUTING: masquerade traffic from nat_outgoing pools to anywhere outside every pool."""
    return {
        POSTROUTING: [
            (
                f"-m set --match-set {ipset_name(NAT_POOLS, 4)} src -m set ! --match-set "
                f"{ipset_name(ALL_POOLS, 4)} dst",
                "-j MASQUERADE",
            )
        ]
    }
