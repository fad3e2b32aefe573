"""The flanneld build's one piece of logic: upstream main.go minus the backends we cannot build (pure)."""

from __future__ import annotations

import pytest

from fabmesh.testenv.assets import FLANNEL_DROPPED_BACKENDS, AssetError, flanneld_main_go

pytestmark = pytest.mark.unit

UPSTREAM = '''package main

import (
\t_ "github.com/flannel-io/flannel/pkg/backend/hostgw"
\t_ "github.com/flannel-io/flannel/pkg/backend/tencentvpc"
\t_ "github.com/flannel-io/flannel/pkg/backend/udp"
\t_ "github.com/flannel-io/flannel/pkg/backend/vxlan"
)
'''


def test_main_go_keeps_vxlan_and_drops_the_unbuildable_backends() -> None:
    patched = flanneld_main_go(UPSTREAM)
    assert "backend/vxlan" in patched and "backend/hostgw" in patched
    assert not any(f"backend/{b}\"" in patched for b in FLANNEL_DROPPED_BACKENDS)
    assert patched.count("\n") == UPSTREAM.count("\n") - len(FLANNEL_DROPPED_BACKENDS)


def test_a_release_without_an_import_to_drop_fails_loudly() -> None:
    with pytest.raises(AssetError, match="backend/udp"):
        flanneld_main_go(UPSTREAM.replace('\t_ "github.com/flannel-io/flannel/pkg/backend/udp"\n', ""))
