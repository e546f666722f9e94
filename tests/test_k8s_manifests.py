"""The Kubernetes example in deploy/k8s/, checked offline (it has not been run on a cluster here): every manifest
validates strictly (no unknown field) against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships
inside its wheel (nothing is fetched), for the oldest and newest versions it knows from 1.29 on; and the pieces
fit: probes on our endpoints, read-only models, the Service and the autoscaler pointing at the Deployment, the
autoscaler's metric served by the Prometheus adapter rule from the series our /metrics exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
VERSIONS = ("1.29.0", "latest")  # autoscaling/v2 and everything used here are GA from 1.29 on
QUEUE_SERIES = "llamacpp:requests_deferred"  # the gauge /metrics exports (issue 15)


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/k8s/ (the kustomization is kustomize's, not the API's), by kind."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                assert doc["kind"] not in out, f"{path.name}: a second {doc['kind']}"
                out[doc["kind"]] = doc | {"_file": path.name}
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    from kubernetes_validate import utils as kv

    if version == "latest":
        version = kv.latest_version()
    found = manifests()
    assert set(found) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "ConfigMap",
    }
    for kind, doc in found.items():
        resource = {k: v for k, v in doc.items() if k != "_file"}
        try:
            kv.validate(resource, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{doc['_file']}: {kind} is not valid Kubernetes {e.version}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            pytest.fail(f"{doc['_file']}: {e.message}")


def test_a_typo_is_caught() -> None:
    """The validator is strict: a misspelt field fails (so the test above is not vacuous)."""
    from kubernetes_validate import utils as kv

    deployment = {k: v for k, v in manifests()["Deployment"].items() if k != "_file"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readinessProbes"):
        kv.validate(deployment, "1.29.0", strict=True)


def test_the_deployment_probes_our_endpoints_and_reads_models_read_only() -> None:
    deployment = manifests()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EDGELLM_SERVE__HOST"] == "0.0.0.0" and int(env["EDGELLM_SERVE__PORT"]) == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    # draining takes time: the grace period outlasts the pre-stop pause and a long answer
    assert pod["terminationGracePeriodSeconds"] >= 60
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/app/models"]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = manifests()["PersistentVolumeClaim"]
    assert claim["claimName"] == pvc["metadata"]["name"] and pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    threads = int(env["EDGELLM_SERVE__MODELS__0__N_THREADS"])
    assert threads == int(container["resources"]["requests"]["cpu"])  # one decoding thread per requested core
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and int(annotations["prometheus.io/port"]) == port


def test_service_and_autoscaler_point_at_the_deployment() -> None:
    found = manifests()
    deployment, service, hpa = found["Deployment"], found["Service"], found["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2  # one replica draining never leaves none
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"

    # The adapter rule turns our series into the metric the autoscaler asks for.
    adapter = yaml.safe_load(found["ConfigMap"]["data"]["config.yaml"])
    [rule] = adapter["rules"]
    assert rule["seriesQuery"].startswith(QUEUE_SERIES + "{")
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_kustomization_lists_the_application_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    expected = {m["_file"] for m in manifests().values() if m["kind"] != "ConfigMap"}
    assert listed == expected  # the adapter rule belongs to the adapter's namespace, applied apart
