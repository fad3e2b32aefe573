"""The iptables and ipset drivers against a real kernel, each test in its own network namespace.

State is read back independently with ``iptables-save`` and ``ipset list`` in that namespace; nothing
here runs a command outside it.
"""

from __future__ import annotations

import subprocess

import pytest

from fabmesh.firewall.ipset import IPSets
from fabmesh.firewall.iptables import FirewallError, IPTables
from fabmesh.firewall.rules import firewall_chains, firewall_jumps, mesh_ipset, remote_ipset, tunnel_match
from fabmesh.mesh.dataplane import Chain, IPSet, Jump

pytestmark = pytest.mark.dataplane

MASQ = "-s 10.99.0.0/16 -o lo -j MASQUERADE"


def sh(ns: str, *argv: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True, check=True
    )
    return proc.stdout


def rules(ns: str, table: str, chain: str, family: int = 4) -> list[str]:
    """The ``-A chain`` specs of ``chain`` as iptables-save prints them."""
    save = sh(ns, "iptables-save" if family == 4 else "ip6tables-save", "-t", table)
    return [line.split(" ", 2)[2] for line in save.splitlines() if line.startswith(f"-A {chain} ")]


def chain_names(ns: str, table: str) -> list[str]:
    save = sh(ns, "iptables-save", "-t", table)
    return [line[1:].split()[0] for line in save.splitlines() if line.startswith(":")]


def members(ns: str, name: str) -> set[str]:
    listing = sh(ns, "ipset", "list", name).splitlines()
    return {line.strip() for line in listing[listing.index("Members:") + 1 :] if line.strip()}


def set_names(ns: str) -> set[str]:
    return set(sh(ns, "ipset", "list", "-n").split())


def mss_chain(*rules: str) -> Chain:
    return Chain("mangle", "FABMESH-MSS", rules)


MSS_JUMP = Jump("mangle", "POSTROUTING", "FABMESH-MSS")


# --- iptables ------------------------------------------------------------------------------------------


def test_set_creates_chains_and_jumps_to_each_exactly_once(netns: str) -> None:
    ipt = IPTables(netns, 4)
    changes = ipt.set(
        [mss_chain("-p tcp -m tcp --dport 22 -j ACCEPT"), Chain("nat", "FABMESH-NAT", ("-j RETURN",))],
        [MSS_JUMP, Jump("nat", "POSTROUTING", "FABMESH-NAT")],
    )

    assert rules(netns, "mangle", "FABMESH-MSS") == ["-p tcp -m tcp --dport 22 -j ACCEPT"]
    assert rules(netns, "mangle", "POSTROUTING") == ["-m comment --comment fabmesh -j FABMESH-MSS"]
    assert rules(netns, "nat", "FABMESH-NAT") == ["-j RETURN"]
    assert rules(netns, "nat", "POSTROUTING") == ["-m comment --comment fabmesh -j FABMESH-NAT"]
    assert ipt.writes == 2  # one transaction per table
    assert len(changes) == 4
    assert ipt.chains("nat", "FABMESH-") == {"FABMESH-NAT": Chain("nat", "FABMESH-NAT", ("-j RETURN",))}


def test_unchanged_second_call_writes_nothing(netns: str) -> None:
    ipt = IPTables(netns, 4)
    desired = ([mss_chain("-p tcp -m tcp --dport 22 -j ACCEPT")], [MSS_JUMP])
    ipt.set(*desired)
    before = sh(netns, "iptables-save", "-t", "mangle")
    writes = ipt.writes

    assert ipt.set(*desired) == []
    assert ipt.writes == writes
    assert IPTables(netns, 4).set(*desired) == []  # canonical rules need no memory across restarts
    assert rules(netns, "mangle", "POSTROUTING") == ["-m comment --comment fabmesh -j FABMESH-MSS"]
    assert sh(netns, "iptables-save", "-t", "mangle").splitlines()[1:-1] == before.splitlines()[1:-1]


def test_rules_in_non_canonical_form_are_not_rewritten_by_an_unchanged_second_call(netns: str) -> None:
    sh(netns, "ipset", "create", "FABMESH-MESH", "hash:net")
    ipt = IPTables(netns, 4)
    chains = [
        mss_chain("-p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu"),
        Chain(
            "nat",
            "FABMESH-NAT",
            (
                "-m set --match-set FABMESH-MESH src -m set --match-set FABMESH-MESH dst -j RETURN",
                "-s 10.99.7.1/16 -o lo -j MASQUERADE",
            ),
        ),
    ]
    jumps = [MSS_JUMP, Jump("nat", "POSTROUTING", "FABMESH-NAT", comment="fabmesh: mesh snat")]
    ipt.set(chains, jumps)
    assert rules(netns, "mangle", "FABMESH-MSS") == [
        "-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu"
    ]
    assert rules(netns, "nat", "FABMESH-NAT")[1] == "-s 10.99.0.0/16 -o lo -j MASQUERADE"
    writes = ipt.writes

    assert ipt.set(chains, jumps) == []
    assert ipt.writes == writes
    assert rules(netns, "nat", "POSTROUTING") == ['-m comment --comment "fabmesh: mesh snat" -j FABMESH-NAT']


def test_changed_rules_replace_the_chain_content(netns: str) -> None:
    ipt = IPTables(netns, 4)
    ipt.set([mss_chain("-p tcp -m tcp --dport 22 -j ACCEPT", "-j RETURN")], [MSS_JUMP])

    changes = ipt.set([mss_chain("-p udp -m udp --dport 500 -j ACCEPT")], [MSS_JUMP])

    assert rules(netns, "mangle", "FABMESH-MSS") == ["-p udp -m udp --dport 500 -j ACCEPT"]
    assert rules(netns, "mangle", "POSTROUTING") == ["-m comment --comment fabmesh -j FABMESH-MSS"]
    assert changes == ["table=mangle action=replace-chain chain=FABMESH-MSS rules=1"]


def test_chain_no_longer_desired_is_deleted_with_its_jump(netns: str) -> None:
    ipt = IPTables(netns, 4)
    nat = Chain("nat", "FABMESH-NAT", ("-j RETURN",))
    ipt.set([mss_chain("-j RETURN"), nat], [MSS_JUMP, Jump("nat", "POSTROUTING", "FABMESH-NAT")])

    ipt.set([nat], [Jump("nat", "POSTROUTING", "FABMESH-NAT")])

    assert "FABMESH-MSS" not in chain_names(netns, "mangle")
    assert rules(netns, "mangle", "POSTROUTING") == []
    assert rules(netns, "nat", "FABMESH-NAT") == ["-j RETURN"]

    ipt.set([], [])
    assert "FABMESH-NAT" not in chain_names(netns, "nat")
    assert rules(netns, "nat", "POSTROUTING") == []


def test_foreign_chains_and_rules_in_builtin_chains_survive_every_change(netns: str) -> None:
    sh(
        netns,
        "iptables-restore",
        "--noflush",
        stdin=f"*nat\n:KUBE-POSTROUTING - [0:0]\n-A KUBE-POSTROUTING -j RETURN\n"
        f"-A POSTROUTING -j KUBE-POSTROUTING\n-A POSTROUTING {MASQ}\nCOMMIT\n",
    )
    ipt = IPTables(netns, 4)
    nat = Chain("nat", "FABMESH-NAT", ("-j RETURN",))

    ipt.set([nat], [Jump("nat", "POSTROUTING", "FABMESH-NAT", position=2)])
    assert rules(netns, "nat", "POSTROUTING") == [
        "-j KUBE-POSTROUTING",
        "-m comment --comment fabmesh -j FABMESH-NAT",
        MASQ,
    ]
    ipt.set([], [])

    assert rules(netns, "nat", "POSTROUTING") == ["-j KUBE-POSTROUTING", MASQ]
    assert rules(netns, "nat", "KUBE-POSTROUTING") == ["-j RETURN"]


def test_duplicate_and_stray_jumps_into_our_chain_are_reduced_to_the_desired_one(netns: str) -> None:
    ipt = IPTables(netns, 4)
    ipt.set([mss_chain("-j RETURN")], [MSS_JUMP])
    sh(
        netns,
        "iptables-restore",
        "--noflush",
        stdin="*mangle\n-A POSTROUTING -m comment --comment fabmesh -j FABMESH-MSS\n"
        "-A POSTROUTING -p tcp -j FABMESH-MSS\n-A OUTPUT -j FABMESH-MSS\nCOMMIT\n",
    )

    ipt.set([mss_chain("-j RETURN")], [MSS_JUMP])

    assert rules(netns, "mangle", "POSTROUTING") == ["-m comment --comment fabmesh -j FABMESH-MSS"]
    assert rules(netns, "mangle", "OUTPUT") == []


def test_refused_batch_raises_with_the_failing_line_and_leaves_the_previous_chain_intact(netns: str) -> None:
    ipt = IPTables(netns, 4)
    ipt.set([mss_chain("-j RETURN")], [MSS_JUMP])
    before = sh(netns, "iptables-save").splitlines()

    with pytest.raises(FirewallError) as refused:
        ipt.set(
            [mss_chain("-p tcp -m tcp --dport 22 -j ACCEPT", "-p tcp --no-such-option -j ACCEPT")],
            [MSS_JUMP, Jump("mangle", "OUTPUT", "FABMESH-MSS")],
        )

    assert refused.value.line == "-A FABMESH-MSS -p tcp --no-such-option -j ACCEPT"
    assert refused.value.line_number is not None
    assert "--no-such-option" in refused.value.reason
    assert rules(netns, "mangle", "FABMESH-MSS") == ["-j RETURN"]
    after = sh(netns, "iptables-save").splitlines()
    assert [x for x in after if not x.startswith("#")] == [x for x in before if not x.startswith("#")]


def test_ip6tables_family_manages_the_ipv6_ruleset_only(netns: str) -> None:
    ipt6 = IPTables(netns, 6)
    ipt6.set([mss_chain("-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu")], [MSS_JUMP])

    assert rules(netns, "mangle", "FABMESH-MSS", family=6) == [
        "-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu"
    ]
    assert "FABMESH-MSS" not in chain_names(netns, "mangle")
    assert IPTables(netns, 4).set([], []) == []


# --- ipset ---------------------------------------------------------------------------------------------


def test_ipset_is_created_with_its_members(netns: str) -> None:
    sets = IPSets(netns)
    changes = sets.set(
        [
            IPSet("FABMESH-MESH", "inet", frozenset({"10.1.0.0/16", "10.2.3.4"})),
            IPSet("FABMESH-MESH6", "inet6", frozenset({"fd00:1::/64"})),
        ],
        "FABMESH-",
    )

    assert members(netns, "FABMESH-MESH") == {"10.1.0.0/16", "10.2.3.4"}
    assert members(netns, "FABMESH-MESH6") == {"fd00:1::/64"}
    assert set_names(netns) == {"FABMESH-MESH", "FABMESH-MESH6"}
    assert changes == [
        "set=FABMESH-MESH action=create members=2",
        "set=FABMESH-MESH6 action=create members=1",
    ]
    assert sets.list("FABMESH-")["FABMESH-MESH"].members == {"10.1.0.0/16", "10.2.3.4/32"}


def test_member_change_is_swapped_into_a_set_an_iptables_rule_uses(netns: str) -> None:
    sets = IPSets(netns)
    sets.set([IPSet("FABMESH-MESH", "inet", frozenset({"10.1.0.0/16", "10.2.0.0/16"}))], "FABMESH-")
    IPTables(netns, 4).set(
        [Chain("filter", "FABMESH-IN", ("-m set --match-set FABMESH-MESH src -j ACCEPT",))],
        [Jump("filter", "INPUT", "FABMESH-IN")],
    )

    changes = sets.set([IPSet("FABMESH-MESH", "inet", frozenset({"10.2.0.0/16", "10.3.0.0/16"}))], "FABMESH-")

    assert members(netns, "FABMESH-MESH") == {"10.2.0.0/16", "10.3.0.0/16"}
    assert set_names(netns) == {"FABMESH-MESH"}  # the temporary set is gone
    assert "References: 1" in sh(netns, "ipset", "list", "-t", "FABMESH-MESH")
    assert changes == ["set=FABMESH-MESH action=replace-members added=1 removed=1"]


def test_unchanged_sets_write_nothing(netns: str) -> None:
    sets = IPSets(netns)
    desired = [IPSet("FABMESH-MESH", "inet", frozenset({"10.1.2.3/8", "192.168.1.1"}))]
    sets.set(desired, "FABMESH-")
    writes = sets.writes

    assert sets.set(desired, "FABMESH-") == []
    assert IPSets(netns).set(desired, "FABMESH-") == []
    assert sets.writes == writes
    assert members(netns, "FABMESH-MESH") == {"10.0.0.0/8", "192.168.1.1"}


def test_stale_set_is_destroyed_and_foreign_sets_are_left_alone(netns: str) -> None:
    sh(netns, "ipset", "create", "KUBE-OTHER", "hash:ip")
    sets = IPSets(netns)
    sets.set([IPSet("FABMESH-OLD", "inet", frozenset({"10.1.0.0/16"}))], "FABMESH-")

    changes = sets.set([], "FABMESH-")

    assert set_names(netns) == {"KUBE-OTHER"}
    assert changes == ["set=FABMESH-OLD action=delete"]


def test_stale_set_still_referenced_by_iptables_is_reported_and_kept(netns: str) -> None:
    sets = IPSets(netns)
    sets.set([IPSet("FABMESH-OLD", "inet", frozenset({"10.1.0.0/16"}))], "FABMESH-")
    sh(
        netns,
        "iptables-restore",
        "--noflush",
        stdin="*filter\n-A INPUT -m set --match-set FABMESH-OLD src -j ACCEPT\nCOMMIT\n",
    )

    changes = sets.set([], "FABMESH-")

    assert set_names(netns) == {"FABMESH-OLD"}
    assert members(netns, "FABMESH-OLD") == {"10.1.0.0/16"}
    assert len(changes) == 1
    assert changes[0].startswith("set=FABMESH-OLD action=keep-stale reason=still referenced")


def test_temporary_set_left_by_an_interrupted_call_is_replaced(netns: str) -> None:
    sets = IPSets(netns)
    sets.set([IPSet("FABMESH-MESH", "inet", frozenset({"10.1.0.0/16"}))], "FABMESH-")
    sh(netns, "ipset", "create", "FABMESH-MESH-tmp", "hash:net")
    sh(netns, "ipset", "add", "FABMESH-MESH-tmp", "10.9.0.0/16")

    sets.set([IPSet("FABMESH-MESH", "inet", frozenset({"10.2.0.0/16"}))], "FABMESH-")

    assert set_names(netns) == {"FABMESH-MESH"}
    assert members(netns, "FABMESH-MESH") == {"10.2.0.0/16"}


def test_ipset_name_longer_than_the_kernel_allows_is_rejected_naming_the_set(netns: str) -> None:
    too_long = "FABMESH-" + "X" * 24  # 32 characters
    with pytest.raises(ValueError, match=too_long):
        IPSet(too_long, "inet", frozenset())

    no_room_for_tmp = "FABMESH-" + "X" * 20  # 28: fits, but its 32-character temporary set would not
    with pytest.raises(ValueError, match=no_room_for_tmp):
        IPSets(netns).set([IPSet(no_room_for_tmp, "inet", frozenset())], "FABMESH-")
    assert set_names(netns) == set()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel-policy-match", "libipsec-tun-device"])
def test_fabmesh_chains_are_written_as_iptables_save_prints_them_so_a_restarted_agent_writes_nothing(
        netns: str, kernel: bool) -> None:
    IPSets(netns).set([mesh_ipset(["10.233.0.0/16"]), remote_ipset(["10.244.0.0/16"])], prefix="FABMESH-")
    chains = firewall_chains(tunnel_mtu=1400, masquerade="10.233.1.0/24",
                             tunnel=tunnel_match(kernel=kernel, device="ipsec0"))
    IPTables(netns, 4).set(chains, firewall_jumps())

    for chain in chains:
        assert rules(netns, chain.table, chain.name) == list(chain.rules)  # literally, no learning needed
    restarted = IPTables(netns, 4)
    assert restarted.set(chains, firewall_jumps()) == [] and restarted.writes == 0
