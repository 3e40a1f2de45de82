"""The manifests parse, carry the fields KubeRay v1 needs, agree with pyproject.toml, and stay private."""

import pathlib
import re
import tomllib

import pytest
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"
PYPROJECT = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())


def pinned(name):
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)$", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


def docs(name):
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def containers(pod_template):
    return pod_template["spec"]["containers"]


def test_dockerfile_versions_match_pyproject():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{pinned('ray')}-py311-gpu"
    assert f"tensorflow[and-cuda]=={pinned('tensorflow')}" in text
    assert re.search(r"^USER ray$", text, re.M) and "latest" not in text


def _check_ray_cluster(spec):
    assert spec["rayVersion"] == pinned("ray")
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(
        "nvidia.com/gpu" in c["resources"]["limits"] for c in containers(g["template"]))]
    assert gpu_groups
    for template in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in containers(template):
            assert ":" in c["image"] and not c["image"].endswith(":latest")
            assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]


def test_rayjob():
    job, config_map = docs("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.")
    assert spec["shutdownAfterJobFinishes"] is True
    for field in ("ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds"):
        assert isinstance(spec[field], int) and spec[field] > 0
    _check_ray_cluster(spec["rayClusterSpec"])
    from worker.schedule import parse_config

    parse_config(yaml.safe_load(config_map["data"]["job.yaml"]))  # the shipped job file validates


def test_raycronjob_wraps_the_same_job():
    (cron,) = docs("raycronjob.yaml")
    assert cron["kind"] == "RayCronJob" and cron["spec"]["schedule"].count(" ") == 4
    assert cron["spec"]["jobTemplate"] == docs("rayjob.yaml")[0]["spec"]
    assert "feature gate" in (DEPLOY / "raycronjob.yaml").read_text()


def test_plain_cronjob_forbids_overlap():
    (cron,) = docs("cronjob.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in containers(pod)[0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_cluster_launcher_keeps_dashboard_private():
    (cluster,) = docs("cluster.yaml")
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"]["CPU"] == 0


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_nothing_is_exposed_publicly(name):
    for doc in docs(name):
        assert doc.get("kind") not in ("Ingress", "Route")
        assert not (doc.get("kind") == "Service" and doc["spec"].get("type") in ("LoadBalancer", "NodePort"))
        assert "0.0.0.0" not in yaml.safe_dump(doc)
