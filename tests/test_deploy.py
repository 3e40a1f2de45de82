"""The manifests as an operator applies them: each path (``kubectl apply -k deploy/<path>``) is complete on its
own, its entrypoints parse with the CLI, every path uses one date rule and one image, core objects validate
against the Kubernetes schema, and nothing is exposed publicly.

``build`` below does what ``kustomize build`` does with the features these kustomizations use (resources,
components, the images transformer on every ``containers`` list, a configMapGenerator without name hashes).
"""

import pathlib
import re
import shlex

import pytest
import tomllib
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"
PYPROJECT = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
PATHS = ["rayjob", "raycronjob", "cronjob"]


def pinned(name):
    for dep in PYPROJECT["project"]["dependencies"]:
        m = re.match(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)$", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


def _load(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _walk(node, visit):
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            _walk(value, visit)
    elif isinstance(node, list):
        for value in node:
            _walk(value, visit)


def build(directory: pathlib.Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    allowed = {"apiVersion", "kind", "resources", "components", "images", "configMapGenerator", "generatorOptions"}
    assert set(kustomization) <= allowed, f"kustomize features this test does not model: {set(kustomization) - allowed}"
    docs = []
    for resource in kustomization.get("resources", []):
        target = directory / resource
        docs += build(target) if target.is_dir() else _load(target)
    transformers = [kustomization]
    for component in kustomization.get("components", []):
        comp = yaml.safe_load((directory / component / "kustomization.yaml").read_text())
        assert comp["kind"] == "Component"
        transformers.append({**comp, "_dir": directory / component})
    for t in transformers:
        base = t.get("_dir", directory)
        for gen in t.get("configMapGenerator", []):
            assert t.get("generatorOptions", {}).get("disableNameSuffixHash") is True, "CRDs name the ConfigMap"
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                         "data": {pathlib.Path(f).name: (base / f).read_text() for f in gen["files"]}})
    for t in transformers:
        for image in t.get("images", []):
            def retag(node, image=image):
                for key in ("containers", "initContainers"):
                    for c in node.get(key, []) if isinstance(node.get(key), list) else []:
                        if c.get("image", "").split(":")[0] == image["name"]:
                            c["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
            for doc in docs:
                _walk(doc, retag)
    return docs


def _settings():
    return yaml.safe_load((DEPLOY / "settings" / "kustomization.yaml").read_text())


def _image():
    (image,) = _settings()["images"]
    return f"{image['newName']}:{image['newTag']}"


def _ray_cluster_specs(docs):
    for doc in docs:
        if doc["kind"] == "RayCluster":
            yield doc["metadata"]["name"], doc["spec"]
        elif doc["kind"] == "RayJob":
            yield doc["metadata"]["name"], doc["spec"]["rayClusterSpec"]
        elif doc["kind"] == "RayCronJob":
            yield doc["metadata"]["name"], doc["spec"]["jobTemplate"]["rayClusterSpec"]


def _commands(docs):
    """Every command line that runs one of our modules: RayJob entrypoints and container commands."""
    out = []

    def visit(node):
        if isinstance(node.get("entrypoint"), str):
            out.append(shlex.split(node["entrypoint"]))
        for c in node.get("containers", []) if isinstance(node.get("containers"), list) else []:
            argv = [*c.get("command", []), *c.get("args", [])]
            if argv:
                out.append(argv)
    for doc in docs:
        _walk(doc, visit)
    return out


def test_dockerfile_versions_match_pyproject():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{pinned('ray')}-py311-gpu"
    assert f"tensorflow[and-cuda]=={pinned('tensorflow')}" in text
    assert re.search(r"^USER ray$", text, re.M) and "latest" not in text
    assert _image() in text  # the build command tags what the manifests pull


@pytest.mark.parametrize("path", PATHS)
def test_each_path_is_complete_on_its_own(path):
    docs = build(DEPLOY / path)
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    # KubeRay makes the token Secret of a RayCluster with token auth, named after the cluster
    secrets |= {name for name, spec in _ray_cluster_specs(docs) if spec.get("authOptions", {}).get("mode") == "token"}
    mounted = {}

    def visit(node):
        for volume in node.get("volumes", []) if isinstance(node.get("volumes"), list) else []:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{path}: ConfigMap {volume} is not defined"
        for c in node.get("containers", []) if isinstance(node.get("containers"), list) else []:
            assert c["image"] == _image(), f"{path}: {c['name']} pulls {c['image']}, not the image of deploy/settings"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, f"{path}: Secret {ref['name']} is neither defined nor made by KubeRay"
            volumes = {v["name"]: v for v in node.get("volumes", [])} if isinstance(node.get("volumes"), list) else {}
            for mount in c.get("volumeMounts", []):
                if mount["name"] in volumes and "configMap" in volumes[mount["name"]]:
                    mounted[mount["mountPath"]] = volumes[mount["name"]]["configMap"]["name"]
    for doc in docs:
        _walk(doc, visit)

    commands = _commands(docs)
    assert commands, f"{path} runs nothing"
    from worker.cli import parser
    from worker.job.schedule import parse_config

    for argv in commands:
        module = argv[argv.index("-m") + 1]
        assert module in ("jobs.explain", "jobs.scheduled", "jobs.audit"), argv
        args = argv[argv.index("-m") + 2:]
        sub = module.split(".")[1]
        parsed = parser().parse_args([sub, *args])  # every flag is one the CLI accepts
        assert "--date" not in args, f"{path}: one date rule (UTC today, in worker.job.schedule), not a shell clock"
        if sub == "scheduled":
            directory, name = parsed.config.rsplit("/", 1)
            assert directory in mounted, f"{path}: {parsed.config} is not mounted where the entrypoint runs"
            parse_config(yaml.safe_load(config_maps[mounted[directory]]["data"][name]))


@pytest.mark.parametrize("path", PATHS)
def test_ray_clusters_follow_pyproject_and_stay_private(path):
    specs = list(_ray_cluster_specs(build(DEPLOY / path)))
    assert specs
    for _, spec in specs:
        assert str(spec["rayVersion"]) == pinned("ray")
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert any("nvidia.com/gpu" in c["resources"]["limits"]
                   for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
        for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True
            for c in template["spec"]["containers"]:
                assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]


def test_run_lifetimes_and_schedules():
    (job,) = [d for d in build(DEPLOY / "rayjob") if d["kind"] == "RayJob"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 600  # GPU nodes are not kept up for an hour after a run
    for field in ("backoffLimit", "activeDeadlineSeconds"):
        assert isinstance(spec[field], int) and spec[field] > 0
    (cron,) = [d for d in build(DEPLOY / "raycronjob") if d["kind"] == "RayCronJob"]
    assert cron["spec"]["jobTemplate"] == spec and cron["spec"]["schedule"].count(" ") == 4
    (plain,) = [d for d in build(DEPLOY / "cronjob") if d["kind"] == "CronJob"]
    assert plain["spec"]["concurrencyPolicy"] == "Forbid"
    assert plain["spec"]["schedule"] == cron["spec"]["schedule"]


@pytest.mark.parametrize("path", PATHS)
def test_core_objects_validate_against_the_kubernetes_schema(path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    core = [d for d in build(DEPLOY / path) if d["apiVersion"] in ("v1", "batch/v1")]
    for doc in core:
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_cluster_launcher_uses_the_same_image_and_keeps_the_dashboard_private():
    (cluster,) = _load(DEPLOY / "cluster.yaml")
    assert cluster["docker"]["image"] == _image()
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"]["CPU"] == 0


@pytest.mark.parametrize("name", sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.yaml")))
def test_nothing_is_exposed_publicly(name):
    for doc in _load(DEPLOY / name):
        assert doc.get("kind") not in ("Ingress", "Route")
        assert not (doc.get("kind") == "Service" and doc["spec"].get("type") in ("LoadBalancer", "NodePort"))
        assert "0.0.0.0" not in yaml.safe_dump(doc)
