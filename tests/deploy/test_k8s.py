"""deploy/k8s: every manifest validates against the Kubernetes schemas, and the pieces fit.

``kubernetes-validate`` (schemas shipped in the package) checks each document strictly (unknown
fields are errors) for the oldest and the newest Kubernetes versions it ships from 1.27 on. Then what
no schema knows: the selectors match the pod labels, the probes and the Service name a port the
container has, the HPA scales the Deployment, the grace period covers the drain, and the ConfigMap's
config file is one Shardon accepts, with the Secret's variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils

from shardon.config import load_config

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSIONS = sorted(
    {v for v in utils.all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 27)},
    key=lambda v: tuple(map(int, v.split("."))),
)


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def by_kind() -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for _, doc in documents():
        assert doc["kind"] not in kinds, f"two {doc['kind']} manifests"
        kinds[doc["kind"]] = doc
    return kinds


def test_the_manifests_that_must_be_there() -> None:
    assert set(by_kind()) == {
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret", "Service",
    }  # fmt: skip


@pytest.mark.parametrize("version", [VERSIONS[0], VERSIONS[-1]])
def test_every_manifest_validates(version: str) -> None:
    for name, doc in documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}) on Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_the_pieces_fit(tmp_path: Path) -> None:
    kinds = by_kind()
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        kinds["Service"]["spec"]["selector"],
    ):
        assert selector.items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container[probe]["httpGet"]["port"] in ports
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] in ports
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "shardon_queue_depth"

    # The config file, as the pod sees it: the ConfigMap at /etc/shardon, the Secret as variables.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert container["args"] == ["serve", "--config", f"{mounts[config_volume]}/shardon.yaml"]
    secret = kinds["Secret"]
    assert container["envFrom"][0]["secretRef"]["name"] == secret["metadata"]["name"]
    (tmp_path / "shardon.yaml").write_text(kinds["ConfigMap"]["data"]["shardon.yaml"])
    config = load_config(tmp_path / "shardon.yaml", environ=secret["stringData"])
    assert config.server.host == "0.0.0.0" and ports["http"] == config.server.port
    assert config.auth.admin_keys == ["sk-admin-change-me"]
    assert config.server.trusted_proxies
    # The request log is written to a volume (the root filesystem is read-only).
    assert Path(config.store.path).parent == Path(mounts["data"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # Stopping: preStop, then the drain and the backends' stop fit in the grace period.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + config.server.drain_timeout_s + config.backend_stop_grace_s
    # A draining pod answers 503: liveness must not restart it before the drain is over.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > config.server.drain_timeout_s
