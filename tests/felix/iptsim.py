"""A small iptables evaluator for felix's rendered chains, so unit tests assert on verdicts.

It understands exactly the matches and targets ``felix/rules.py`` emits (and fails loudly on
anything else), so a test says "a TCP packet to port 22 from B is dropped" instead of comparing
command lines.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

IptRule = tuple[str, str]


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: int = 6
    sport: int = 40000
    dport: int = 80
    icmp_type: int | None = None
    icmp_code: int | None = None
    iif: str = ""
    oif: str = ""
    ctstate: str = "NEW"
    mark: int = 0


def _iface_match(pattern: str, name: str) -> bool:
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


def _ports(spec: str, port: int) -> bool:
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


class Sim:
    def __init__(self, chains: Mapping[str, Sequence[IptRule]], ipsets: Mapping[str, set[str]]) -> None:
        self.chains = chains
        self.ipsets = ipsets
        self.visited: list[str] = []

    def _in_set(self, name: str, addr: str) -> bool:
        if name not in self.ipsets:
            raise AssertionError(f"rule references ipset {name} that is not programmed")
        a = ipaddress.ip_address(addr)
        return any(a in ipaddress.ip_network(m) for m in self.ipsets[name])

    def matches(self, match: str, p: Packet) -> bool:
        toks = shlex.split(match)
        i = 0
        neg = False
        module = ""
        while i < len(toks):
            t = toks[i]
            if t == "!":
                neg = True
                i += 1
                continue
            ok: bool
            if t == "-m":
                module = toks[i + 1]
                i += 2
                continue
            if t == "-p":
                name = toks[i + 1]
                num = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "sctp": 132, "udplite": 136}.get(name)
                ok = p.proto == (num if num is not None else int(name))
                i += 2
            elif t in ("-s", "-d"):
                addr = p.src if t == "-s" else p.dst
                ok = ipaddress.ip_address(addr) in ipaddress.ip_network(toks[i + 1])
                i += 2
            elif t in ("-i", "-o"):
                ok = _iface_match(toks[i + 1], p.iif if t == "-i" else p.oif)
                i += 2
            elif t == "--match-set":
                ok = self._in_set(toks[i + 1], p.src if toks[i + 2] == "src" else p.dst)
                i += 3
            elif t in ("--sports", "--dports"):
                assert module == "multiport"
                ok = p.proto in (6, 17, 132, 136) and _ports(toks[i + 1], p.sport if t == "--sports" else p.dport)
                i += 2
            elif t in ("--icmp-type", "--icmpv6-type"):
                typ, _, code = toks[i + 1].partition("/")
                ok = p.icmp_type == int(typ) and (not code or p.icmp_code == int(code))
                i += 2
            elif t == "--mark":
                val, _, mask = toks[i + 1].partition("/")
                ok = (p.mark & int(mask, 16)) == int(val, 16)
                i += 2
            elif t == "--ctstate":
                ok = p.ctstate in toks[i + 1].split(",")
                i += 2
            else:
                raise AssertionError(f"simulator does not know {t!r} in {match!r}")
            if ok == neg:
                return False
            neg = False
        return True

    def run(self, chain: str, p: Packet) -> tuple[str, Packet]:
        """Evaluate ``chain``; returns (verdict, packet) with verdict ACCEPT, DROP or RETURN."""
        self.visited.append(chain)
        if chain not in self.chains:
            raise AssertionError(f"jump to chain {chain} that is not programmed")
        for match, target in self.chains[chain]:
            if not self.matches(match, p):
                continue
            toks = shlex.split(target)
            kind, arg = toks[0], toks[1]
            if kind == "-g":
                return self.run(arg, p)
            if arg in ("ACCEPT", "DROP", "RETURN"):
                return arg, p
            if arg == "MARK":
                val, _, mask = toks[3].partition("/")
                p = replace(p, mark=(p.mark & ~int(mask, 16)) | int(val, 16))
                continue
            if arg in ("LOG", "MASQUERADE"):
                continue
            verdict, p = self.run(arg, p)
            if verdict != "RETURN":
                return verdict, p
        return "RETURN", p

    def hook(self, chain: str, p: Packet) -> str:
        """A built-in hook: RETURN from our chain means the packet goes on (ACCEPT by default)."""
        verdict, _ = self.run(chain, p)
        return "ACCEPT" if verdict == "RETURN" else verdict


def split_line(line: str) -> IptRule:
    """A rendered rule (``<match> -m comment --comment "calyx:…" <target>``) back into (match, target)."""
    toks = shlex.split(line)
    if "--comment" in toks:
        at = toks.index("--comment")
        assert toks[at - 2 : at] == ["-m", "comment"] and toks[at + 1].startswith("calyx:"), line
        toks = toks[: at - 2] + toks[at + 2 :]
    cut = next(i for i, t in enumerate(toks) if t in ("-j", "-g"))
    return shlex.join(toks[:cut]), shlex.join(toks[cut:])


def sim_for(table: object, ipsets: Mapping[str, set[str]]) -> Sim:
    """A simulator over an IptablesTable's desired chains (as the driver renders them)."""
    chains = {name: [split_line(line) for line in table.desired_rules(name)]  # type: ignore[attr-defined]
              for name in table.chain_names}  # type: ignore[attr-defined]
    return Sim(chains, ipsets)
