"""ipset driver: keep our ``hash:net`` sets equal to a desired set, never showing a half-filled one.

iptables rules match mesh traffic against sets of CIDRs (``-m set --match-set FABMESH-MESH src``). Those rules
read the set on every packet, so a set must never be seen half-filled: a set whose members change is
rebuilt off to the side as ``<name>-tmp`` in one ``ipset restore`` batch, then ``swap``-ed in (atomic in the
kernel, which also swaps the reference counts, so the old contents end up unreferenced in the temporary set
and can be destroyed). A new set is built the same way and ``rename``-d into place. A set that did not
change is not written at all.

Kernel quirks handled here:

- Set names are at most 31 characters (IPSET_MAXNAMELEN is 32 with the NUL); since ``<name>-tmp`` must fit
  too, our names are at most 27.
- ``swap`` refuses sets of different type or family, so a set whose family changed is destroyed and
  recreated, which the kernel only allows while no rule references it.
- ``destroy`` fails while an iptables rule (or a list:set) references the set. A stale set that is still
  referenced is reported and left in place, and retried on the next call.
- ``hash:net`` stores a network, not the address it was given (``10.1.2.3/8`` is kept as ``10.0.0.0/8``),
  prints a host without its ``/32``/``/128``, and cannot hold a ``/0``; members are canonicalised the same
  way on both sides before comparing.
"""

from __future__ import annotations

import builtins
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from fabmesh.firewall.iptables import FirewallError, run_tool
from fabmesh.mesh.dataplane import MAX_SET_NAME, Family, IPSet, canonical_member

log = logging.getLogger(__name__)

TMP_SUFFIX = "-tmp"
SET_TYPE = "hash:net"
DEFAULT_MAXELEM = 65536
_REFERENCES = re.compile(r"^References:\s*(\d+)", re.MULTILINE)


class Action(StrEnum):
    CREATE = "create"
    REPLACE_MEMBERS = "replace-members"
    RECREATE = "recreate"
    DELETE = "delete"
    KEEP_STALE = "keep-stale"


@dataclass(frozen=True)
class _Observed:
    name: str
    type: str
    family: str
    members: frozenset[str]


def parse_save(text: str) -> dict[str, _Observed]:
    """Parse ``ipset save`` output (``create``/``add`` lines) into sets by name."""
    headers: dict[str, tuple[str, str]] = {}
    members: dict[str, set[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "create":
            options = words[3:]
            family = options[options.index("family") + 1] if "family" in options[:-1] else ""
            headers[words[1]] = (words[2], family)
            members[words[1]] = set()
        elif len(words) >= 3 and words[0] == "add" and words[1] in members:
            members[words[1]].add(" ".join(words[2:]))
    result = {}
    for name, (kind, family) in headers.items():
        found = members[name]
        if kind == SET_TYPE and family in tuple(Family):
            found = {_tolerant_canonical(m, family) for m in found}
        result[name] = _Observed(name, kind, family, frozenset(found))
    return result


def _tolerant_canonical(member: str, family: str) -> str:
    # An entry we would not write (``nomatch``, a /0 from another tool) stays as printed, so it differs
    # from every desired member and the set gets rebuilt.
    try:
        return canonical_member(member, family)
    except ValueError:
        return member


class IPSets:
    """Reconciler for our hash:net sets in one network namespace (None: the current one).

    ``writes`` counts the writing commands run (``ipset restore`` and ``ipset destroy``).
    """

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.writes = 0

    def list(self, prefix: str) -> dict[str, IPSet]:
        """Our hash:net sets as the kernel holds them (sets of another type are not listed)."""
        return {
            name: IPSet(name, seen.family, seen.members)
            for name, seen in self._observe(prefix).items()
            if seen.type == SET_TYPE and seen.family in tuple(Family)
        }

    def set(self, desired: Iterable[IPSet], prefix: str) -> builtins.list[str]:
        """Make our sets exactly ``desired``; return one line per change (or per stale set left in place).

        One set's failure does not stop the others; the first is raised afterwards (later ones as notes).
        """
        desired = sorted(desired, key=lambda s: s.name)
        _validate(desired, prefix)
        observed = self._observe(prefix)
        changes: list[str] = []
        errors: list[FirewallError] = []
        handled: set[str] = set()
        for want in desired:
            handled |= {want.name, want.name + TMP_SUFFIX}
            try:
                change = self._converge(want, observed)
            except FirewallError as err:
                errors.append(err)
                continue
            if change is not None:
                log.debug(change)
                changes.append(change)
        for name in sorted(observed.keys() - handled):
            try:
                change = self._delete(name)
            except FirewallError as err:
                errors.append(err)
                continue
            changes.append(change)
        if errors:
            raise FirewallError.first_of(errors, changes)
        return changes

    def _converge(self, want: IPSet, observed: dict[str, _Observed]) -> str | None:
        have = observed.get(want.name)
        tmp = want.name + TMP_SUFFIX
        if have == _Observed(want.name, SET_TYPE, want.family, want.members):
            return None
        maxelem = max(DEFAULT_MAXELEM, len(want.members))
        batch = [f"destroy {tmp}"] if tmp in observed else []  # left over from an interrupted call
        if have is not None and (have.type, have.family) != (SET_TYPE, want.family):
            # swap refuses sets of another type or family: replace the set outright.
            batch.append(f"destroy {want.name}")
            have = None
            action = Action.RECREATE
        elif have is None:
            action = Action.CREATE
        else:
            action = Action.REPLACE_MEMBERS
        batch.append(f"create {tmp} {SET_TYPE} family {want.family} maxelem {maxelem}")
        batch.extend(f"add {tmp} {member}" for member in sorted(want.members))
        if have is None:
            batch.append(f"rename {tmp} {want.name}")
        else:
            batch += [f"swap {tmp} {want.name}", f"destroy {tmp}"]
        self.writes += 1
        try:
            run_tool(self.netns, ["ipset", "restore"], f"set={want.name}", stdin="\n".join(batch) + "\n")
        except FirewallError:
            self._discard(tmp)
            raise
        if action is Action.REPLACE_MEMBERS and have is not None:
            added = len(want.members - have.members)
            removed = len(have.members - want.members)
            return f"set={want.name} action={action} added={added} removed={removed}"
        return f"set={want.name} action={action} members={len(want.members)}"

    def _delete(self, name: str) -> str:
        references = self._references(name)
        if references == 0:
            self.writes += 1
            try:
                run_tool(self.netns, ["ipset", "destroy", name], f"set={name}")
            except FirewallError as err:
                if "in use" not in err.reason:
                    raise
            else:
                change = f"set={name} action={Action.DELETE}"
                log.debug(change)
                return change
        change = (
            f"set={name} action={Action.KEEP_STALE} reason=still referenced by an iptables rule or list:set; "
            f"remove the reference and it is destroyed on the next call"
        )
        log.warning(change)
        return change

    def _references(self, name: str) -> int:
        terse = run_tool(self.netns, ["ipset", "list", "-t", name], f"set={name}")
        found = _REFERENCES.search(terse)
        return int(found.group(1)) if found else 0

    def _discard(self, tmp: str) -> None:
        """Best effort: remove a temporary set a failed batch left behind."""
        if tmp in self._observe(tmp):
            self.writes += 1
            try:
                run_tool(self.netns, ["ipset", "destroy", tmp], f"set={tmp}")
            except FirewallError as err:
                log.warning("set=%s action=discard-temporary failed: %s", tmp, err.reason)

    def _observe(self, prefix: str) -> dict[str, _Observed]:
        sets = parse_save(run_tool(self.netns, ["ipset", "save"], "sets=all"))
        return {name: seen for name, seen in sets.items() if name.startswith(prefix)}


def _validate(desired: list[IPSet], prefix: str) -> None:
    if not prefix:
        raise ValueError("prefix must not be empty: every set would count as ours")
    twice = sorted(name for name, count in Counter(s.name for s in desired).items() if count > 1)
    if twice:
        raise ValueError(f"ipsets desired twice: {twice}")
    names = {s.name for s in desired}
    for s in desired:
        if not s.name.startswith(prefix):
            raise ValueError(f"ipset {s.name}: name must start with the prefix {prefix!r}")
        if len(s.name) + len(TMP_SUFFIX) > MAX_SET_NAME:
            raise ValueError(
                f"ipset {s.name}: name is {len(s.name)} characters; at most "
                f"{MAX_SET_NAME - len(TMP_SUFFIX)} so that {s.name + TMP_SUFFIX!r} fits the kernel's "
                f"{MAX_SET_NAME}"
            )
        if s.name + TMP_SUFFIX in names:
            raise ValueError(f"ipset {s.name + TMP_SUFFIX}: clashes with the temporary set of {s.name}")
