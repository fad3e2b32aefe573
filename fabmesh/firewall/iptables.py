"""iptables driver: keep the chains with our prefix, and the jumps into them, equal to a desired set.

fabmesh owns a few chains (MSS clamping, NAT exemptions for mesh traffic, accept rules) that live next to
kube-proxy's and the CNI's in the same tables. Every ``set()`` reads the real ruleset with ``iptables-save``,
diffs it against the desired chains and jumps, and writes only what differs, as ONE
``iptables-restore --noflush`` transaction per table: a packet never sees a half-written chain and a
refused batch leaves the table exactly as it was. A chain is ours when its name starts with the prefix; a
rule outside our chains is ours only when its target is one of our chains. Everything else is left alone.

Kernel and tool quirks handled here:

- iptables-save does not print a rule as it was written: ``-p tcp`` gains ``-m tcp``, ``-s 10.0.0.1/8``
  becomes ``-s 10.0.0.0/8``, a host gets ``/32``, comments are quoted. Normalisation rule: a desired rule
  is compared in the form iptables-save printed it the last time this object wrote it. After every write
  the driver reads the written chains back and records, rule by rule, "text we wrote -> text
  iptables-save prints"; a rule this object never wrote is compared as given. So the first ``set()`` of a
  process may refill a chain whose rules were written in a non-canonical form (harmless: one atomic
  flush-and-refill), and every later unchanged call writes nothing. Keep one ``IPTables`` per namespace
  and family for the life of the process; rules written in iptables-save's own form never cause a
  rewrite, not even after a restart.
- With ``--noflush``, declaring a chain that exists (``:X - [0:0]``) flushes it, so only the chains
  being refilled are declared.
- ``-X`` needs the chain empty and unreferenced: stale chains are flushed and every jump into them is
  deleted earlier in the same transaction.
- A jump's position only applies when it is inserted (clamped to the chain's length, because
  ``-I CHAIN n`` past the end is refused). An existing jump is never moved: other controllers insert
  at the top too, and fighting them over position would rewrite the chain on every resync.
- iptables-nft reports some errors (an unknown target, a missing ipset) at ``COMMIT``, so the line quoted
  in ``FirewallError`` can be ``COMMIT``; the reason names the object it choked on.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from fabmesh.mesh.dataplane import Chain, Jump

log = logging.getLogger(__name__)

RESTORE_WAIT_SECONDS = "5"  # xtables lock (iptables-legacy only; iptables-nft accepts and ignores it)

_ERROR_LINE = re.compile(r"line:? (\d+)")
_TOOL_PREFIX = re.compile(r"^\S+ v[\d.]+(?: \([\w-]+\))?:\s*")


class Action(StrEnum):
    CREATE_CHAIN = "create-chain"
    REPLACE_CHAIN = "replace-chain"
    DELETE_CHAIN = "delete-chain"
    ADD_JUMP = "add-jump"
    DELETE_JUMP = "delete-jump"


class FirewallError(RuntimeError):
    """A firewall tool refused a command or batch.

    For iptables-restore nothing of the table's batch was applied. ``line_number`` and ``line`` point
    into the batch that was sent, when the tool said where it stopped. ``changes`` lists what the
    same call did change before it raised (other tables, other sets), for the caller to log.
    """

    def __init__(
        self, tool: str, subject: str, reason: str, line_number: int | None = None, line: str | None = None
    ) -> None:
        self.tool = tool
        self.subject = subject
        self.reason = reason
        self.line_number = line_number
        self.line = line
        self.changes: list[str] = []
        where = f" at line {line_number}" if line_number is not None else ""
        text = f" ({line!r})" if line is not None else ""
        super().__init__(f"{tool} failed for {subject}{where}{text}: {reason}")

    @staticmethod
    def first_of(errors: list[FirewallError], changes: list[str]) -> FirewallError:
        """One error for a call that kept going after failures: the first, the others as notes,
        carrying every change the call did make."""
        for other in errors[1:]:
            errors[0].add_note(str(other))
        errors[0].changes = changes
        return errors[0]


def run_tool(netns: str | None, argv: Sequence[str], subject: str, stdin: str | None = None) -> str:
    """Run a tool (inside ``netns`` when set) and return its stdout; raise FirewallError on failure.

    When ``stdin`` is a batch and the tool names the failing line, the error quotes that line.
    """
    cmd = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return proc.stdout
    messages = [
        _TOOL_PREFIX.sub("", m.strip())
        for m in proc.stderr.splitlines()
        if m.strip() and not m.startswith(("Try `", "Error occurred at line"))
    ]
    reason = "; ".join(m for m in messages if m) or f"exit status {proc.returncode}"
    found = _ERROR_LINE.search(proc.stderr)
    line_number = int(found.group(1)) if found else None
    line = None
    if stdin is not None and line_number is not None:
        batch = stdin.splitlines()
        if 0 < line_number <= len(batch):
            line = batch[line_number - 1]
    raise FirewallError(argv[0], subject, reason, line_number, line)


Ruleset = dict[str, dict[str, list[str]]]  # table -> chain -> rule specs, in kernel order


def parse_save(text: str) -> Ruleset:
    """Parse iptables-save output; rule specs keep exactly the text iptables-save printed."""
    tables: Ruleset = {}
    chains: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("*"):
            chains = tables.setdefault(line[1:], {})
        elif chains is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            name, _, spec = line[3:].partition(" ")
            chains.setdefault(name, []).append(spec)
    return tables


def jump_target(spec: str) -> str | None:
    """The chain or target a rule spec hands packets to (``-j``/``-g``), if any."""
    try:
        tokens = shlex.split(spec)
    except ValueError:
        return None
    for i in range(len(tokens) - 2, -1, -1):
        if tokens[i] in ("-j", "--jump", "-g", "--goto"):
            return tokens[i + 1]
    return None


@dataclass(frozen=True)
class TablePlan:
    """The body of one table's iptables-restore transaction and the change it makes, one line each."""

    table: str
    lines: tuple[str, ...]
    changes: tuple[str, ...]
    written: tuple[str, ...]  # chains refilled, to read back for normalisation

    def batch(self) -> str:
        return "\n".join((f"*{self.table}", *self.lines, "COMMIT")) + "\n"


def plan_table(
    table: str,
    observed: Mapping[str, Sequence[str]],
    chains: Sequence[Chain],
    jumps: Sequence[Jump],
    prefix: str,
    canonical: Callable[[str], str],
) -> TablePlan:
    """Diff one table's observed chains against the desired ones; empty ``lines`` means nothing to do."""
    declare: list[str] = []
    flush: list[str] = []
    append: list[str] = []
    delete: list[str] = []
    insert: list[str] = []
    destroy: list[str] = []
    changes: list[str] = []
    written: list[str] = []

    for chain in sorted(chains, key=lambda c: c.name):
        have = observed.get(chain.name)
        if have is not None and list(have) == [canonical(r) for r in chain.rules]:
            continue
        declare.append(f":{chain.name} - [0:0]")
        flush.append(f"-F {chain.name}")
        append.extend(f"-A {chain.name} {rule}" for rule in chain.rules)
        written.append(chain.name)
        action = Action.CREATE_CHAIN if have is None else Action.REPLACE_CHAIN
        changes.append(f"table={table} action={action} chain={chain.name} rules={len(chain.rules)}")

    # Rules outside our chains that hand packets to one of ours, keyed (from_chain, to_chain).
    found: dict[tuple[str, str], list[str]] = {}
    for name, rules in observed.items():
        if name.startswith(prefix):
            continue
        for spec in rules:
            target = jump_target(spec)
            if target is not None and target.startswith(prefix):
                found.setdefault((name, target), []).append(spec)

    length = {name: len(rules) for name, rules in observed.items()}
    wanted = {(j.from_chain, j.to_chain): j for j in jumps}
    present: set[tuple[str, str]] = set()
    for key in sorted(found):
        jump = wanted.get(key)
        want = canonical(jump.rule) if jump is not None else None
        for spec in found[key]:
            if spec == want and key not in present:
                present.add(key)
                continue
            delete.append(f"-D {key[0]} {spec}")
            length[key[0]] -= 1
            changes.append(f"table={table} action={Action.DELETE_JUMP} from={key[0]} to={key[1]} rule={spec}")
    for jump in sorted(jumps, key=lambda j: (j.from_chain, j.position, j.to_chain)):
        if (jump.from_chain, jump.to_chain) in present:
            continue
        position = min(jump.position, length.get(jump.from_chain, 0) + 1)
        insert.append(f"-I {jump.from_chain} {position} {jump.rule}")
        length[jump.from_chain] = length.get(jump.from_chain, 0) + 1
        changes.append(
            f"table={table} action={Action.ADD_JUMP} from={jump.from_chain} to={jump.to_chain} "
            f"position={position}"
        )

    desired = {c.name for c in chains}
    for name in sorted(n for n in observed if n.startswith(prefix) and n not in desired):
        flush.append(f"-F {name}")
        destroy.append(f"-X {name}")
        changes.append(f"table={table} action={Action.DELETE_CHAIN} chain={name}")

    lines = (*declare, *delete, *flush, *append, *insert, *destroy)
    return TablePlan(table, lines, tuple(changes), tuple(written))


def _validate(chains: Sequence[Chain], jumps: Sequence[Jump], prefix: str) -> None:
    if not prefix:
        raise ValueError("prefix must not be empty: every chain would count as ours")
    names: set[tuple[str, str]] = set()
    for chain in chains:
        where = f"chain {chain.table}/{chain.name}"
        if not chain.name.startswith(prefix):
            raise ValueError(f"{where}: name must start with the prefix {prefix!r}")
        if (chain.table, chain.name) in names:
            raise ValueError(f"{where}: desired twice")
        names.add((chain.table, chain.name))
    pairs: set[tuple[str, str, str]] = set()
    for jump in jumps:
        where = f"jump {jump.table}/{jump.from_chain}->{jump.to_chain}"
        if jump.from_chain.startswith(prefix):
            raise ValueError(f"{where}: from_chain is one of ours; put the jump in that chain's rules")
        if (jump.table, jump.to_chain) not in names:
            raise ValueError(f"{where}: to_chain is not a desired chain of table {jump.table}")
        if (jump.table, jump.from_chain, jump.to_chain) in pairs:
            raise ValueError(f"{where}: desired twice")
        pairs.add((jump.table, jump.from_chain, jump.to_chain))


class IPTables:
    """Reconciler for our chains in one network namespace and one address family.

    ``netns`` None means the current namespace. ``writes`` counts iptables-restore runs.
    """

    def __init__(self, netns: str | None, family: Literal[4, 6]) -> None:
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, got {family!r}")
        self.netns = netns
        self.family = family
        self.writes = 0
        tool = "iptables" if family == 4 else "ip6tables"
        self._save = f"{tool}-save"
        self._restore = f"{tool}-restore"
        # (table, rule as we write it) -> rule as iptables-save prints it; see the module docstring.
        self._canonical: dict[tuple[str, str], str] = {}

    def chains(self, table: str, prefix: str) -> dict[str, Chain]:
        """Our chains in ``table``, with rules exactly as iptables-save prints them."""
        observed = self._read(table).get(table, {})
        ours = {name: rules for name, rules in observed.items() if name.startswith(prefix)}
        return {name: Chain(table, name, tuple(rules)) for name, rules in ours.items()}

    def set(self, chains: Iterable[Chain], jumps: Iterable[Jump], prefix: str = "FABMESH-") -> list[str]:
        """Make our chains and jumps exactly ``chains`` and ``jumps``; return one line per change.

        Tables are applied one transaction each; a table whose batch is refused is left untouched, the
        others are still applied, and the first refusal is raised (later ones as notes).
        """
        chains = tuple(chains)
        jumps = tuple(jumps)
        _validate(chains, jumps, prefix)
        observed = self._read(None)
        tables = (
            {c.table for c in chains}
            | {j.table for j in jumps}
            | {t for t, cs in observed.items() if any(n.startswith(prefix) for n in cs)}
        )
        changes: list[str] = []
        errors: list[FirewallError] = []
        for table in sorted(tables):
            table_chains = [c for c in chains if c.table == table]
            table_jumps = [j for j in jumps if j.table == table]
            plan = plan_table(
                table,
                observed.get(table, {}),
                table_chains,
                table_jumps,
                prefix,
                lambda rule, t=table: self._canonical.get((t, rule), rule),
            )
            if not plan.lines:
                continue
            self.writes += 1
            try:
                run_tool(
                    self.netns,
                    [self._restore, "-w", RESTORE_WAIT_SECONDS, "--noflush"],
                    f"table={table}",
                    stdin=plan.batch(),
                )
            except FirewallError as err:
                errors.append(err)
                continue
            for line in plan.changes:
                log.debug("family=ipv%d %s", self.family, line)
            changes.extend(plan.changes)
            self._learn(table, [c for c in table_chains if c.name in plan.written], table_jumps)
        if errors:
            raise FirewallError.first_of(errors, changes)
        return changes

    def _learn(self, table: str, written: Sequence[Chain], jumps: Sequence[Jump]) -> None:
        observed = self._read(table).get(table, {})
        for chain in written:
            have = observed.get(chain.name, [])
            if len(have) != len(chain.rules):
                continue  # someone else changed it already; the next resync compares literally
            for rule, printed in zip(chain.rules, have, strict=True):
                if rule != printed:
                    self._canonical[(table, rule)] = printed
        for jump in jumps:
            printed = [r for r in observed.get(jump.from_chain, []) if jump_target(r) == jump.to_chain]
            if len(printed) == 1 and printed[0] != jump.rule:
                self._canonical[(table, jump.rule)] = printed[0]

    def _read(self, table: str | None) -> Ruleset:
        argv = [self._save] if table is None else [self._save, "-t", table]
        return parse_save(run_tool(self.netns, argv, f"table={table or 'all'}"))
