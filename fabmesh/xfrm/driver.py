"""fabmesh's own xfrm policies: bypasses for a node's local traffic, blocks under its tunnels.

With the kernel IPsec backend, charon installs xfrm policies for each tunnel's traffic selectors. An
edge's tunnel to the connector carries the whole edge pool (``10.233.0.0/16``), which contains the
edge's own pod CIDR (``10.233.1.0/24``): without help, the bridge gateway pinging a local pod
matches the outbound policy and is encrypted towards the connector (or, with no SA yet, dropped),
and a pod's reply matches the inbound policy and is dropped for having arrived unencrypted
(``XfrmInTmplMismatch``). Routing cannot fix this: xfrm policies are looked up after the route. The
fix is a policy with no template (``action allow``: "send as is") and a better priority. The kernel
prefers the *lowest* priority number; charon's policies are never below 68541 (strongSwan 5.5.1+
computes them from ``PRIO_BASE`` 200000 minus selector-specificity bonuses), so fabmesh's default of
5 always wins.

The opposite gap: charon's policies exist only while a CHILD_SA is up, and with none the kernel
sends a packet the route gives the uplink as is, in clear. ``action block`` policies with the
tunnels' outbound selectors at a priority worse than any charon writes (``BLOCK_PRIORITY_BAND``,
from 1000000; charon's fallback policies sit near 600000) fill that gap: overridden while the SA is
up, dropping the packet otherwise (``XfrmOutPolBlock`` in ``/proc/net/xfrm_stat``).

Which policies are ours. The kernel keeps no free-form tag on an xfrm policy (nothing like a route's
protocol number) and a ``mark`` is a *selector*: a policy with one matches only packets carrying
that skb mark, so it would miss exactly the traffic a bypass or a block exists for. A policy is
therefore ours when it has exactly the shape fabmesh writes, and nothing else:

* type ``main``, direction ``in``, ``out`` or ``fwd``; ``action allow`` with a priority in
  ``PRIORITY_BAND`` (1-999) or ``action block`` with one in ``BLOCK_PRIORITY_BAND``;
* no template (every policy charon installs for a tunnel has one), no mark, no ``if_id``, no
  security context, no flags, no protocol or port in the selector, and a device in it only as
  blocks have one (lifetime limits are not printed by ``ip xfrm policy list`` and not checked:
  nobody puts them on these).

``ip xfrm policy add`` without ``priority`` gives 0, outside both bands, so a policy a person typed
in is left alone; charon's pass/drop shunts (no template) sit between 68541 and ~600000 unless
swanctl sets ``priority`` explicitly, which fabmesh never does.

``ip xfrm policy list priority 5`` shows the bypasses fabmesh wrote, ``... priority 1000000`` the blocks.

Why ``ip`` and not pyroute2: pyroute2 0.9.7 defines the ``NETLINK_XFRM`` protocol number and
nothing else for it (no message classes, no IPRoute method), so using it would mean hand-encoding
``struct xfrm_userpolicy_info``. ``ip xfrm`` has no JSON output (``ip -j xfrm policy`` silently
prints text), so we parse its text, whose shape has not changed in years, strictly: anything we do
not recognise as exactly our shape is someone else's. ``ip -n <netns>`` is ``ip netns exec <netns>
ip`` without the extra exec. One command per write, so one refused policy does not stop the others.

Kernel quirks handled here:

* A policy's identity is (type, direction, selector, mark, if_id, security context); the priority is
  not part of it. A second ``add`` with the same selector fails with EEXIST whatever the priority,
  so a priority change is one ``update`` (no window without a bypass), and a selector held by a
  policy we do not own is reported, never taken over.
* The kernel stores selector addresses as given (``10.233.1.1/24`` and ``10.233.1.0/24`` are two
  policies). We only write canonical networks; one observed with host bits is not what we would
  write, so it is deleted by its exact text and the canonical one added.
"""

from __future__ import annotations

import builtins
import ipaddress
import logging
import os
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from fabmesh.mesh.dataplane import BLOCK_PRIORITY_BAND, PRIORITY_BAND, Direction, XfrmAction, XfrmPolicy

log = logging.getLogger(__name__)

_BANDS = {XfrmAction.ALLOW: PRIORITY_BAND, XfrmAction.BLOCK: BLOCK_PRIORITY_BAND}
_C_LOCALE = {**os.environ, "LC_ALL": "C"}  # error texts are matched below


class _Verb(StrEnum):
    ADD = "add"
    UPDATE = "update"
    DELETE = "delete"


class XfrmError(RuntimeError):
    """``ip xfrm`` could not read or write policies; the message names the namespace and the reason."""


@dataclass(frozen=True)
class PolicyFailure:
    policy: XfrmPolicy
    reason: str

    def __str__(self) -> str:
        return f"{self.policy}: {self.reason}"


class PoliciesNotApplied(XfrmError):
    """Some policies could not be written or removed; every other change was made (``changes``)."""

    def __init__(self, netns: str | None, failures: Iterable[PolicyFailure], changes: Sequence[str]) -> None:
        self.failures = tuple(failures)
        self.changes = list(changes)
        listed = "; ".join(str(f) for f in self.failures)
        super().__init__(f"netns={netns or '-'}: {len(self.failures)} xfrm policy change(s) failed: {listed}")


@dataclass(frozen=True)
class _Installed:
    """One of our policies as the kernel holds it; ``src``/``dst`` as printed, to delete exactly it."""

    policy: XfrmPolicy
    src: str = field(compare=False)
    dst: str = field(compare=False)

    @property
    def canonical(self) -> bool:
        """True when the kernel holds it in the form we write (no host bits)."""
        return (self.src, self.dst) == (self.policy.src, self.policy.dst) or _same_networks(self)


class XfrmPolicies:
    """Reconciler for fabmesh's xfrm policies (bypasses and blocks) in ``netns`` (``None``: the current namespace).

    ``writes`` counts the writing commands run (``ip xfrm policy add/update/delete``), failed ones included.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.writes = 0

    def list(self) -> builtins.set[XfrmPolicy]:
        """Our policies as the kernel holds them (canonicalised)."""
        return {installed.policy for installed in self._observe()}

    def set(self, desired: Iterable[XfrmPolicy]) -> builtins.list[str]:
        """Make our policies exactly ``desired``; return one line per change made.

        Policies that are not ours (see the module docstring) are never changed. Missing ones are
        added (or updated in place when only the priority differs) before stale ones are deleted,
        so a change of subnets never leaves a moment without a bypass or a block. A policy that cannot be
        written does not stop the others; ``PoliciesNotApplied`` lists the failures afterwards.
        """
        failures: list[PolicyFailure] = []
        wanted: dict[str, XfrmPolicy] = {}
        for policy in sorted(set(desired)):
            if policy.key() in wanted:
                reason = f"selector already asked for at priority {wanted[policy.key()].priority}"
                failures.append(PolicyFailure(policy, reason))
            else:
                wanted[policy.key()] = policy

        kept: builtins.set[str] = set()
        stale: list[_Installed] = []
        for installed in self._observe():
            key = installed.policy.key()
            if installed.canonical and wanted.get(key) == installed.policy and key not in kept:
                kept.add(key)
            else:
                stale.append(installed)

        changes: list[str] = []
        replaced: builtins.set[int] = set()  # ids of stale policies that an update overwrote
        for key, policy in wanted.items():
            if key in kept:
                continue
            old = next((s for s in stale if s.canonical and s.policy.key() == key and id(s) not in replaced), None)
            if old is not None:
                replaced.add(id(old))
                verb = _Verb.UPDATE
            else:
                verb = _Verb.ADD
            if self._write(verb, policy, failures):
                changes.append(self._changed(f"action={verb}-xfrm-{policy.kind} {policy}"))
        for old in stale:
            if id(old) not in replaced and self._delete(old, failures):
                changes.append(self._changed(f"action=delete-xfrm-{old.policy.kind} {old.policy}"))

        if failures:
            raise PoliciesNotApplied(self.netns, failures, changes)
        return changes

    # -- observing -----------------------------------------------------------------------------

    def _observe(self) -> builtins.list[_Installed]:
        return [i for i in map(_parse_ours, _blocks(self._ip("policy", "list"))) if i is not None]

    # -- writing -------------------------------------------------------------------------------

    def _write(self, verb: _Verb, policy: XfrmPolicy, failures: builtins.list[PolicyFailure]) -> bool:
        selector = ["src", policy.src, "dst", policy.dst, *(["dev", policy.dev] if policy.dev else []),
                    "dir", policy.direction]
        try:
            self._send(verb, *selector, "priority", str(policy.priority), "action", policy.action)
        except XfrmError as exc:
            reason = str(exc)
            if "RTNETLINK answers: File exists" in reason:
                reason = "an xfrm policy fabmesh does not own already holds this selector and direction"
            failures.append(PolicyFailure(policy, reason))
            return False
        return True

    def _delete(self, old: _Installed, failures: builtins.list[PolicyFailure]) -> bool:
        try:
            dev = ["dev", old.policy.dev] if old.policy.dev else []
            self._send(_Verb.DELETE, "src", old.src, "dst", old.dst, *dev, "dir", old.policy.direction)
        except XfrmError as exc:
            if "RTNETLINK answers: No such file or directory" in str(exc):
                return False  # already gone
            failures.append(PolicyFailure(old.policy, f"cannot delete: {exc}"))
            return False
        return True

    def _send(self, verb: _Verb, *args: str) -> None:
        self.writes += 1
        self._ip("policy", verb, *args)

    def _ip(self, *args: str) -> str:
        argv = ["ip", *(["-n", self.netns] if self.netns else []), "xfrm", *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False, env=_C_LOCALE)
        except OSError as exc:
            raise XfrmError(f"cannot run {argv[0]}: {exc}") from exc
        if done.returncode != 0:
            reason = "; ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
            raise XfrmError(f"{' '.join(argv)}: {reason or f'exit status {done.returncode}'}")
        return done.stdout

    def _changed(self, what: str) -> str:
        log.debug("netns=%s %s", self.netns or "-", what)
        return what


def _blocks(text: str) -> builtins.list[builtins.list[str]]:
    """``ip xfrm policy list`` output split into one list of lines per policy."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line[0].isspace() and blocks:
            blocks[-1].append(line.strip())
        else:
            blocks.append([line.strip()])
    return blocks


def _parse_ours(block: builtins.list[str]) -> _Installed | None:
    """The policy a block describes, if it has exactly the shape fabmesh writes; None otherwise.

    Ours print as two lines, ``src A dst B [dev D]`` and ``dir D [action block] priority P ptype main``
    (``action allow`` is the default and not printed); a mark, ``if_id``, template or context would
    add lines, a protocol or port would add words to the first, a flag to the second.
    """
    if len(block) != 2:
        return None
    selector, attributes = block[0].split(), block[1].split()
    if len(selector) not in (4, 6) or selector[0] != "src" or selector[2] != "dst" or len(attributes) % 2:
        return None
    dev = ""
    if len(selector) == 6:
        if selector[4] != "dev":
            return None
        dev = selector[5]
    values = dict(zip(attributes[::2], attributes[1::2], strict=True))
    action = values.get("action", XfrmAction.ALLOW)
    if (
        len(values) * 2 != len(attributes)
        or not values.keys() <= {"dir", "priority", "ptype", "action"}
        or values.get("ptype", "main") != "main"
        or action not in tuple(XfrmAction)
        or values.get("dir") not in tuple(Direction)
        or (dev and action != XfrmAction.BLOCK)
        or not values.get("priority", "").isdigit()
        or int(values["priority"]) not in _BANDS[XfrmAction(action)]
    ):
        return None
    src, dst = selector[1], selector[3]
    try:
        policy = XfrmPolicy(
            src=str(ipaddress.ip_network(src, strict=False)),
            dst=str(ipaddress.ip_network(dst, strict=False)),
            direction=Direction(values["dir"]),
            priority=int(values["priority"]),
            action=XfrmAction(action),
            dev=dev,
        )
    except ValueError:
        return None
    return _Installed(policy=policy, src=src, dst=dst)


def _same_networks(installed: _Installed) -> bool:
    try:
        return (ipaddress.ip_network(installed.src), ipaddress.ip_network(installed.dst)) == (
            ipaddress.ip_network(installed.policy.src),
            ipaddress.ip_network(installed.policy.dst),
        )
    except ValueError:
        return False
