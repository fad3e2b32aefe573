"""Which tunnel proposals and node paths the settings accept, and that the operator, mesh.yaml and the chart's
schema all apply the same rule (one allow-list, in fabmesh/mesh/crypto.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fabmesh.mesh.crypto import DH, Kind, proposal_pattern, proposal_problem
from fabmesh.mesh.model import MeshConfigError, NodeSettings, TunnelSettings, error_field, parse_node_mesh
from fabmesh.operator.settings import AgentPods, OperatorSettings, SettingsError, load_settings

CHART = Path(__file__).resolve().parents[2] / "charts" / "fabmesh"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SETTINGS_SCHEMA = SCHEMA["properties"]["operator"]["properties"]["settings"]["properties"]

# (kind, proposal, accepted, words the refusal must contain)
PROPOSALS = [
    pytest.param(Kind.IKE, "aes256gcm16-prfsha256-ecp256", True, "", id="ike-default-aes256-ecp256"),
    pytest.param(Kind.IKE, "aes128gcm16-prfsha256-x25519", True, "", id="ike-default-aes128-x25519"),
    pytest.param(Kind.IKE, "chacha20poly1305-prfsha512-x448", True, "", id="ike-chacha-x448"),
    pytest.param(Kind.IKE, "aes256gcm16-prfsha384-ecp384", True, "", id="ike-ecp384"),
    pytest.param(Kind.IKE, "aes256gcm16-prfsha512-ecp521", True, "", id="ike-ecp521"),
    pytest.param(Kind.IKE, "aes256gcm16-prfsha256-modp3072", True, "", id="ike-modp3072"),
    pytest.param(Kind.IKE, "aes256gcm16-prfsha256-curve25519", True, "", id="ike-curve25519-alias"),
    pytest.param(Kind.IKE, "aes256gcm16-aes128gcm16-prfsha256-prfsha384-ecp256-x25519", True, "",
                 id="ike-several-of-each"),
    pytest.param(Kind.IKE, "aes128-sha1-modp1024", False, "'aes128' is not an allowed AEAD cipher",
                 id="ike-cbc-sha1-modp1024"),
    pytest.param(Kind.IKE, "aes256-sha256-ecp256", False, "'aes256' is not an allowed AEAD cipher",
                 id="ike-cbc-cipher"),
    pytest.param(Kind.IKE, "aes256gcm16-prfsha1-ecp256", False, "'prfsha1'", id="ike-prf-sha1"),
    pytest.param(Kind.IKE, "aes256gcm16-prfsha256-modp2048", False, "'modp2048' is not an allowed PRF or DH group",
                 id="ike-modp2048"),
    pytest.param(Kind.IKE, "aes256gcm16-prfsha256-ecp256-modp1024", False, "'modp1024'",
                 id="ike-weak-group-among-strong"),
    pytest.param(Kind.IKE, "aes256gcm16-ecp256", False, "'ecp256' is not an allowed AEAD cipher or PRF",
                 id="ike-without-prf"),
    pytest.param(Kind.IKE, "aes256gcm16-prfsha256", False, "no DH group", id="ike-without-group"),
    pytest.param(Kind.IKE, "ecp256-prfsha256-aes256gcm16", False, "'ecp256'", id="ike-out-of-order"),
    pytest.param(Kind.IKE, "default", False, "'default'", id="ike-default-keyword"),
    pytest.param(Kind.IKE, "", False, "''", id="ike-empty"),
    pytest.param(Kind.IKE, "AES256GCM16-PRFSHA256-ECP256", False, "'AES256GCM16'", id="ike-upper-case"),
    pytest.param(Kind.ESP, "aes256gcm16-ecp256", True, "", id="esp-default-aes256-ecp256"),
    pytest.param(Kind.ESP, "aes128gcm16-x25519", True, "", id="esp-default-aes128-x25519"),
    pytest.param(Kind.ESP, "chacha20poly1305-modp4096", True, "", id="esp-chacha-modp4096"),
    pytest.param(Kind.ESP, "aes256gcm16", False, "no DH group", id="esp-without-pfs"),
    pytest.param(Kind.ESP, "aes128-sha1-modp1024", False, "'aes128' is not an allowed AEAD cipher",
                 id="esp-cbc-sha1-modp1024"),
    pytest.param(Kind.ESP, "aes256gcm16-prfsha256-ecp256", False, "'prfsha256'", id="esp-with-prf"),
    pytest.param(Kind.ESP, "aes256gcm16-modp1024", False, "'modp1024' is not an allowed", id="esp-modp1024"),
    pytest.param(Kind.ESP, "aes256gcm16-ecp256-esn", False, "'esn'", id="esp-esn-not-listed"),
    pytest.param(Kind.ESP, "null-ecp256", False, "'null'", id="esp-null-cipher"),
]


@pytest.mark.parametrize(("kind", "proposal", "accepted", "reason"), PROPOSALS)
def test_proposal_allow_list(kind: Kind, proposal: str, accepted: bool, reason: str) -> None:
    problem = proposal_problem(kind, proposal)
    if accepted:
        assert problem is None
    else:
        assert problem is not None and reason in problem, problem


@pytest.mark.parametrize(("kind", "proposal", "accepted", "reason"), PROPOSALS)
def test_chart_schema_pattern_accepts_exactly_what_the_model_accepts(kind: Kind, proposal: str, accepted: bool,
                                                                     reason: str) -> None:
    field = "ike_proposals" if kind is Kind.IKE else "esp_proposals"
    pattern = SETTINGS_SCHEMA["tunnel"]["properties"][field]["items"]["pattern"]
    assert pattern == proposal_pattern(kind), "values.schema.json drifted from fabmesh/mesh/crypto.py"
    assert bool(re.search(pattern, proposal)) is accepted


@pytest.mark.parametrize(("kind", "proposal", "accepted", "reason"), PROPOSALS)
def test_tunnel_settings_refuse_a_proposal_naming_the_field(kind: Kind, proposal: str, accepted: bool,
                                                            reason: str) -> None:
    field = "ike_proposals" if kind is Kind.IKE else "esp_proposals"
    good = TunnelSettings().model_dump()[field][0]
    data = {field: [good, proposal]}
    if accepted:
        assert getattr(TunnelSettings.model_validate(data), field) == (good, proposal)
        return
    with pytest.raises(ValidationError) as err:
        TunnelSettings.model_validate(data)
    (error,) = err.value.errors()
    assert error_field(error["loc"]) == f"{field}[1]"
    assert error["msg"].startswith(f"{proposal!r} is not allowed: ") and reason in error["msg"]


def test_default_esp_proposals_carry_a_dh_group_so_child_sa_rekeys_have_pfs() -> None:
    esp = TunnelSettings().esp_proposals
    assert esp
    for proposal in esp:
        assert set(proposal.split("-")) & set(DH), f"{proposal} has no DH group: a CHILD_SA rekey has no PFS"


def test_default_ike_proposals_use_groups_the_installed_plugins_provide() -> None:
    # Debian's strongSwan has no curve25519 plugin; x25519 comes from openssl (loaded by name).
    for proposal in TunnelSettings().ike_proposals:
        assert "curve25519" not in proposal


def test_operator_settings_file_refusal_names_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "operator.yaml"
    path.write_text(yaml.safe_dump({"tunnel": {"esp_proposals": ["aes256gcm16-ecp256", "aes128-sha1-modp1024"]}}))
    with pytest.raises(SettingsError) as err:
        load_settings(path)
    assert str(err.value).startswith(f"{path}: tunnel.esp_proposals[1]: 'aes128-sha1-modp1024' is not allowed: ")


def test_operator_refuses_an_empty_proposal_list(tmp_path: Path) -> None:
    path = tmp_path / "operator.yaml"
    path.write_text(yaml.safe_dump({"tunnel": {"ike_proposals": []}}))
    with pytest.raises(SettingsError, match=r"tunnel\.ike_proposals: "):
        load_settings(path)


def test_mesh_yaml_with_a_weak_proposal_is_refused_naming_the_field() -> None:
    text = ("apiVersion: fabmesh.io/v1alpha1\nkind: NodeMesh\n"
            "node: {name: e1, role: edge, address: 192.0.2.1, endpoint: 192.0.2.1}\n"
            "local_subnets: [10.233.1.0/24]\nmesh_cidrs: [10.233.0.0/16]\ncaCert: x\n"
            "tunnel: {esp_proposals: [aes256gcm16]}\n")
    with pytest.raises(MeshConfigError) as err:
        parse_node_mesh(text)
    assert err.value.field == "tunnel.esp_proposals[0]"
    assert "no DH group" in err.value.reason


# -- node paths -----------------------------------------------------------------------------------------------

CONF_DIRS = [
    pytest.param("/etc/cni/net.d", True, "", id="default"),
    pytest.param("/", True, "", id="root"),
    pytest.param("/opt/cni/.hidden", True, "", id="dot-file-component"),
    pytest.param("etc/cni/net.d", False, "absolute", id="relative"),
    pytest.param("", False, "absolute", id="empty"),
    pytest.param("/etc/cni/../../root", False, "normalised", id="dot-dot"),
    pytest.param("/etc/cni/./net.d", False, "normalised", id="dot"),
    pytest.param("/etc/cni/net.d/", False, "normalised", id="trailing-slash"),
    pytest.param("/etc//cni", False, "normalised", id="double-slash"),
    pytest.param("//etc/cni", False, "normalised", id="leading-double-slash"),
]

CONF_NAMES = [
    pytest.param("10-fabmesh.conflist", True, id="default"),
    pytest.param("99_fabmesh.v2.conflist", True, id="dots-and-underscore"),
    pytest.param("10-fabmesh.conf", False, id="single-plugin-conf-suffix"),
    pytest.param("../10-fabmesh.conflist", False, id="parent-dir"),
    pytest.param("net.d/10-fabmesh.conflist", False, id="slash"),
    pytest.param("/etc/cni/net.d/10-fabmesh.conflist", False, id="absolute"),
    pytest.param(".conflist", False, id="no-stem"),
    pytest.param("10-fabmesh.json", False, id="json-suffix"),
    pytest.param("", False, id="empty"),
]


@pytest.mark.parametrize(("value", "accepted", "reason"), CONF_DIRS)
def test_cni_conf_dir_must_be_absolute_and_normalised(value: str, accepted: bool, reason: str) -> None:
    pattern = SETTINGS_SCHEMA["node"]["properties"]["cni_conf_dir"]["pattern"]
    assert bool(re.search(pattern, value)) is accepted, "the chart's schema disagrees"
    if accepted:
        assert NodeSettings(cni_conf_dir=value).cni_conf_dir == value
        return
    with pytest.raises(ValidationError) as err:
        NodeSettings(cni_conf_dir=value)
    (error,) = err.value.errors()
    assert error_field(error["loc"]) == "cni_conf_dir" and reason in error["msg"], error["msg"]


@pytest.mark.parametrize(("value", "accepted"), CONF_NAMES)
def test_cni_conf_name_must_be_a_plain_conflist_file_name(value: str, accepted: bool) -> None:
    pattern = SETTINGS_SCHEMA["node"]["properties"]["cni_conf_name"]["pattern"]
    assert bool(re.search(pattern, value)) is accepted, "the chart's schema disagrees"
    if accepted:
        assert NodeSettings(cni_conf_name=value).cni_conf_name == value
        return
    with pytest.raises(ValidationError) as err:
        NodeSettings(cni_conf_name=value)
    (error,) = err.value.errors()
    assert error_field(error["loc"]) == "cni_conf_name" and ".conflist" in error["msg"]


def test_operator_settings_file_refusal_names_the_node_field(tmp_path: Path) -> None:
    path = tmp_path / "operator.yaml"
    path.write_text(yaml.safe_dump({"node": {"cni_conf_dir": "/etc/cni/../../root"}}))
    with pytest.raises(SettingsError, match=r": node\.cni_conf_dir: '/etc/cni/\.\./\.\./root' is not allowed: "):
        load_settings(path)


# -- the chart's defaults are the operator's defaults ---------------------------------------------------------

def test_chart_values_match_the_operator_defaults_for_tunnel_node_and_agent_resources() -> None:
    values = OperatorSettings.model_validate(VALUES["operator"]["settings"])
    defaults = OperatorSettings()
    assert values.tunnel == defaults.tunnel
    assert values.node == defaults.node
    assert values.hole_punching is defaults.hole_punching is True
    assert values.agent_pods.resources == AgentPods().resources
    assert values.agent_pods.strongswan_resources == AgentPods().strongswan_resources


@pytest.mark.parametrize("quantity", ["lots", "-1", "1.5.0", "10 Mi"])
def test_agent_pod_resources_refuse_a_malformed_quantity(tmp_path: Path, quantity: str) -> None:
    path = tmp_path / "operator.yaml"
    path.write_text(yaml.safe_dump({"agent_pods": {"resources": {"limits": {"memory": quantity}}}}))
    with pytest.raises(SettingsError, match=r": agent_pods\.resources\.limits\.memory: "):
        load_settings(path)


def test_an_ipv6_edge_pod_pool_is_refused_until_the_agents_program_ipv6() -> None:
    from pydantic import ValidationError

    from fabmesh.operator.settings import OperatorSettings

    with pytest.raises(ValidationError, match="IPv4 only for now"):
        OperatorSettings(edge_pod_pool="fd00:233::/48", edge_pod_prefix_len=64, cloud_pod_cidrs=("fd00:244::/48",),
                         service_cidr="fd00:96::/108")
