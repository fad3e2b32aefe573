"""The observed path of a probe, from the SA counters it moved (table-tested, no charon)."""

from __future__ import annotations

import pytest

from fabmesh.mesh.probepath import Counted, Observed, counted, counters, observed_path

pytestmark = pytest.mark.unit
EDGES = {"edge-1", "edge-2", "edge-3"}


def _sa(packets: dict[str, tuple[int, int]], uniqueid: str = "1") -> dict:
    return {"child-sas": {f"{name}-{uniqueid}": {"uniqueid": uniqueid, "spi-in": f"c{uniqueid}",
                                                 "packets-in": str(i), "packets-out": str(o)}
                          for name, (i, o) in packets.items()}}


def _c(host: str, peer: str, out: int = 1, inn: int = 0) -> Counted:
    return Counted(host, peer, inn, out)


CASES = {
    "direct": ("edge-1", "edge-2", [_c("edge-1", "edge-2"), _c("edge-2", "edge-1")], Observed.DIRECT),
    "relayed": ("edge-1", "edge-3", [_c("edge-1", "connector-1"), _c("connector-1", "edge-3")], Observed.RELAYED),
    # the direct SA is down: the probe crossed the connector although the pair shares a community
    "relayed-instead-of-direct": ("edge-1", "edge-2", [_c("edge-1", "connector-1"), _c("connector-1", "edge-2")],
                                  Observed.RELAYED),
    "relay-half-way": ("edge-1", "edge-3", [_c("edge-1", "connector-1")], Observed.NONE),
    "nothing-counted": ("edge-1", "edge-2", [], Observed.NONE),
    "received-only-is-not-sent": ("edge-1", "edge-2", [_c("edge-1", "edge-2", out=0, inn=1)], Observed.NONE),
    "edge-to-cloud": ("edge-1", "cloud-2", [_c("edge-1", "connector-1")], Observed.CLOUD),
    "cloud-to-edge": ("cloud-2", "edge-3", [_c("connector-1", "edge-3")], Observed.CLOUD),
    "cloud-to-edge-not-counted": ("cloud-2", "edge-3", [], Observed.NONE),
    "cloud-to-cloud": ("cloud-2", "connector-1", [], Observed.CLOUD),
    "local": ("edge-1", "edge-1", [], Observed.LOCAL),
}


@pytest.mark.parametrize("src,dst,evidence,expected", CASES.values(), ids=CASES.keys())
def test_observed_path(src: str, dst: str, evidence: list[Counted], expected: Observed) -> None:
    assert observed_path(src, dst, EDGES, "connector-1", evidence) is expected


def test_counted_reports_only_moved_sas_and_counts_a_rekeyed_sa_from_zero() -> None:
    before = counters("edge-1", [("edge-2", _sa({"edge-2": (10, 10)})),
                                 ("connector-1", _sa({"connector-1": (5, 5)}))])
    # edge-2's CHILD_SA was rekeyed (new unique id, counters from 0); the connector SA did not move
    after = counters("edge-1", [("edge-2", _sa({"edge-2": (1, 1)}, uniqueid="2")),
                                ("connector-1", _sa({"connector-1": (5, 5)}))])
    assert counted(before, after) == [Counted("edge-1", "edge-2", 1, 1)]


def test_two_ike_sas_of_one_connection_are_summed() -> None:
    after = counters("connector-1", [("edge-1", _sa({"edge-1": (1, 0)}, "1")),
                                     ("edge-1", _sa({"edge-1": (0, 2)}, "2"))])
    assert counted({}, after) == [Counted("connector-1", "edge-1", 1, 2)]
