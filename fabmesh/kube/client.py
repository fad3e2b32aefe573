"""A thin JSON client for the few Kubernetes calls fabmesh makes, on the official ``kubernetes`` package.

The generated client validates every body into pydantic models and back; at
10,000 Nodes that is most of a resync's CPU, and we want plain dicts anyway (the
planner reads JSON). So we reuse the package's ``ApiClient`` for what it is good
at (kubeconfig, TLS, auth, retries) and send and receive JSON ourselves.
Watches and leader election use the package as it is.

Every write is counted in :attr:`Kube.writes` by verb and kind, which is how
tests prove that a resync with nothing changed writes nothing. Every call has a
timeout (an API server that stops answering must not stall a caller for ever), and
every write first asks the optional ``write_guard`` how long it may take: a leader
elector's fence plugs in there, so no write path can forget it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from kubernetes import client, config

JSON = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"{status} {reason}: {body[:300]}")
        self.status, self.reason, self.body = status, reason, body

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404


def load_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """From a kubeconfig path, else in-cluster, else ``~/.kube/config``.

    urllib3's hidden retries are off: by default it re-sends a GET or PUT whose
    read timed out, up to three times, each with a fresh timeout, so a call could
    take four times its timeout and a write could land after the caller gave up on
    it (after the leader's fence closed). Callers retry themselves.
    """
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    configuration.retries = False
    return client.ApiClient(configuration)


def _path(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    group = {"leases": "/apis/coordination.k8s.io/v1", "tunnelstatuses": "/apis/fabmesh.io/v1alpha1",
             "serviceaccounts": "/api/v1", "roles": "/apis/rbac.authorization.k8s.io/v1",
             "rolebindings": "/apis/rbac.authorization.k8s.io/v1",
             "deployments": "/apis/apps/v1"}.get(kind, "/api/v1")
    path = group + (f"/namespaces/{namespace}" if namespace else "") + f"/{kind}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


TOO_MANY_REQUESTS_RETRIES = 3
MAX_RETRY_AFTER_S = 2.0


def _retry_after(text: str) -> float:
    """The pause a 429 asks for (``details.retryAfterSeconds``), at most ``MAX_RETRY_AFTER_S``."""
    try:
        seconds = float(json.loads(text).get("details", {}).get("retryAfterSeconds", 1))
    except (ValueError, AttributeError):
        seconds = 1.0
    return min(max(seconds, 0.1), MAX_RETRY_AFTER_S)


class Kube:
    def __init__(self, api: client.ApiClient, timeout: float = 30.0, field_manager: str | None = None,
                 write_guard: Callable[[], float] | None = None) -> None:
        """``field_manager`` names us in ``metadata.managedFields``; ``write_guard`` returns the seconds a
        write may take, or raises to refuse it (see ``fabmesh.operator.election``)."""
        self.api = api
        self.timeout = timeout
        self.field_manager = field_manager
        self.write_guard = write_guard
        self.writes: Counter[str] = Counter()

    def _call(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
              content_type: str = "application/json", timeout: float | None = None) -> JSON:
        if query:
            path = f"{path}?{urlencode(query)}"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, payload, _ = self.api.param_serialize(
            method=method, resource_path=path, header_params=headers,
            body=body, auth_settings=["BearerToken"])
        for attempt in range(TOO_MANY_REQUESTS_RETRIES + 1):
            response = self.api.call_api(method, url, header_params=headers, body=payload,
                                         _request_timeout=self.timeout if timeout is None
                                         else min(self.timeout, timeout))
            response.read()
            text = response.data.decode() if response.data else ""
            if response.status == 429 and attempt < TOO_MANY_REQUESTS_RETRIES:
                # Not processed (API priority and fairness, or a new CRD's storage still initialising):
                # safe to send again after the pause the server asks for, as client-go does.
                time.sleep(_retry_after(text))
                continue
            if not 200 <= response.status < 300:
                raise ApiError(response.status, response.reason or "", text)
            return json.loads(text) if text else {}
        raise AssertionError("unreachable")

    def _write(self, verb: str, kind: str, method: str, path: str, body: Any = None,
               query: dict[str, str] | None = None, content_type: str = "application/json",
               timeout: float | None = None) -> JSON:
        if self.write_guard is not None:
            budget = self.write_guard()
            timeout = budget if timeout is None else min(timeout, budget)
        self.writes[f"{verb}:{kind}"] += 1
        if self.field_manager and method != "DELETE":
            query = {**(query or {}), "fieldManager": self.field_manager}
        return self._call(method, path, body, query, content_type, timeout)

    def list(self, kind: str, namespace: str | None = None, labels: str | None = None) -> list[JSON]:
        query = {"labelSelector": labels} if labels else None
        return self._call("GET", _path(kind, namespace), query=query).get("items", [])

    def get(self, kind: str, name: str, namespace: str | None = None,
            timeout: float | None = None, sub: str | None = None) -> JSON | None:
        try:
            return self._call("GET", _path(kind, namespace, name, sub), timeout=timeout)
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def create(self, kind: str, body: JSON, namespace: str | None = None, timeout: float | None = None) -> JSON:
        return self._write("create", kind, "POST", _path(kind, namespace), body, timeout=timeout)

    def replace(self, kind: str, body: JSON, namespace: str | None = None, timeout: float | None = None) -> JSON:
        """PUT; the body's ``metadata.resourceVersion`` makes it a compare-and-swap (409 on a race)."""
        return self._write("update", kind, "PUT", _path(kind, namespace, body["metadata"]["name"]), body,
                           timeout=timeout)

    def merge_patch(self, kind: str, name: str, patch: JSON, namespace: str | None = None,
                    sub: str | None = None) -> JSON:
        """JSON merge patch; ``sub`` names a subresource (``status``)."""
        return self._write("patch", kind, "PATCH", _path(kind, namespace, name, sub), patch,
                           content_type="application/merge-patch+json")

    def delete(self, kind: str, name: str, namespace: str | None = None,
               grace_period_s: int | None = None) -> bool:
        """Delete; ``grace_period_s=0`` force-deletes a Pod whose kubelet will never confirm."""
        query = {"gracePeriodSeconds": str(grace_period_s)} if grace_period_s is not None else None
        try:
            self._write("delete", kind, "DELETE", _path(kind, namespace, name), query=query)
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        return True

    def delete_collection(self, kind: str, namespace: str, labels: str) -> None:
        """Delete every ``kind`` in ``namespace`` matching ``labels`` in one call (verb ``deletecollection``:
        the caller never needs to read the objects, e.g. Secrets)."""
        self._write("deletecollection", kind, "DELETE", _path(kind, namespace), query={"labelSelector": labels})
