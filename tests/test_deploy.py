"""The manifests as an operator applies them and as Ray and KubeRay then behave: each path
(``kubectl apply -k deploy/<path>``, rendered here by ``kubectl kustomize``) is complete on its own, its
entrypoints parse with the CLI, every path uses one date rule and one image, the job's demand fits the workers an
autoscaler can start, every pod has the object store's credentials and passes the ``restricted`` Pod Security
Standard, the CronJob's submitter follows the Ray job it submitted, no two paths share a name KubeRay derives,
deadlines end before the next trigger, client commands send the token to an address, the cluster launcher opens
nothing, core objects validate against the Kubernetes schema, and nothing is exposed publicly.
"""

import functools
import ipaddress
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import tomllib
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"
GUIDE = (DEPLOY.parent / "docs" / "guide" / "deploy.md").read_text()  # what an operator is told
PYPROJECT = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
PATHS = ["rayjob", "raycronjob", "cronjob"]
# the node types the manifests name: vCPUs, memory (GiB), GPUs
NODE_TYPES = {"g6e.4xlarge": (16, 128, 1), "m6i.xlarge": (4, 16, 0)}
DECODE_CPUS_PER_GPU = 8  # docs, Performance and sizing: 8-12 decode CPUs per GPU, plus 1 for its actor


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


@functools.cache
def _rendered(path: str) -> str:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize built in) is needed to render deploy/ as an operator applies it")
    return subprocess.run(["kubectl", "kustomize", str(DEPLOY / path)], check=True, capture_output=True,
                          text=True, timeout=60).stdout


def render(path: str) -> list[dict]:
    """What ``kubectl apply -k deploy/<path>`` applies (a fresh copy each call)."""
    return [d for d in yaml.safe_load_all(_rendered(path)) if d]


def _one(docs, kind):
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _launcher():
    (cluster,) = _load(DEPLOY / "cluster.yaml")
    return cluster


def _job_file():
    return yaml.safe_load((DEPLOY / "settings" / "job.yaml").read_text())


def _image():
    (image,) = yaml.safe_load((DEPLOY / "settings" / "kustomization.yaml").read_text())["images"]
    return f"{image['newName']}:{image['newTag']}"


def _ray_cluster_specs(docs):
    for doc in docs:
        if doc["kind"] == "RayCluster":
            yield doc["metadata"]["name"], doc["spec"]
        elif doc["kind"] == "RayJob":
            yield doc["metadata"]["name"], doc["spec"]["rayClusterSpec"]
        elif doc["kind"] == "RayCronJob":
            yield doc["metadata"]["name"], doc["spec"]["jobTemplate"]["rayClusterSpec"]


def _job_specs(docs):
    for doc in docs:
        if doc["kind"] == "RayJob":
            yield doc["spec"]
        elif doc["kind"] == "RayCronJob":
            yield doc["spec"]["jobTemplate"]


def _pod_templates(docs):
    """(role, pod spec) of every pod a path makes: Ray heads and workers, RayJob submitters, CronJob pods."""
    for name, spec in _ray_cluster_specs(docs):
        yield f"{name} head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield f"{name} worker {group['groupName']}", group["template"]["spec"]
    for spec in _job_specs(docs):
        if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
            assert "submitterPodTemplate" in spec, "KubeRay's default submitter pod has no securityContext"
            yield "submitter", spec["submitterPodTemplate"]["spec"]
    for doc in docs:
        if doc["kind"] == "CronJob":
            yield "cronjob submitter", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _gpu_groups(spec):
    return [g for g in spec["workerGroupSpecs"]
            if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]


def _cron_script(docs):
    (container,) = _one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["bash", "-c"], container["command"]
    return container, container["command"][2]


def _submit_argv(script):
    """The ``ray job submit`` command of a shell script, as argv."""
    joined = script.replace("\\\n", " ")
    (line,) = [ln for ln in joined.splitlines() if "ray job submit" in ln]
    argv = shlex.split(line[line.index("ray job submit"):].split("||")[0])
    return argv


def _commands(docs):
    """Every command line that runs one of our modules: RayJob entrypoints and what the CronJob submits."""
    out = [shlex.split(spec["entrypoint"]) for spec in _job_specs(docs)]
    if any(d["kind"] == "CronJob" for d in docs):
        argv = _submit_argv(_cron_script(docs)[1])
        out.append(argv[argv.index("--") + 1:])
    return out


def _period_s(schedule):
    """The period of a cron schedule this project uses: daily ('M H * * *')."""
    fields = schedule.split()
    assert len(fields) == 5 and fields[0].isdigit() and fields[1].isdigit() and fields[2:] == ["*"] * 3, schedule
    return 86400


def test_dockerfile_versions_match_pyproject():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{pinned('ray')}-py311-gpu"
    assert f"tensorflow[and-cuda]=={pinned('tensorflow')}" in text
    assert re.search(r"^USER ray$", text, re.M) and "latest" not in text
    assert _image() in text  # the build command tags what the manifests pull


def _build_check():
    """The Dockerfile's RUN line and the Python its build check runs."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    (run,) = [ln for ln in text.splitlines() if ln.startswith("RUN ")]
    return run, re.search(r'python -c "([^"]+)"', run).group(1)


def test_the_image_build_checks_what_the_job_imports():
    """``import worker, jobs`` is lazy and proves nothing: the build runs pip check and imports TensorFlow and
    Ray at the pinned versions, the engine, the driver and the entrypoints."""
    run, code = _build_check()
    assert "&& pip check" in run
    compile(code, "Dockerfile", "exec")
    for module in ("tensorflow", "ray", "worker.engine", "worker.job.driver", "jobs.scheduled"):
        assert re.search(rf"\b{re.escape(module)}\b", code), f"the build does not import {module}"
    assert repr(pinned("tensorflow")) in code and repr(pinned("ray")) in code


@pytest.mark.slow
def test_the_image_build_check_passes_with_the_pinned_versions():
    """The build's import check, run as the image build runs it, in a fresh interpreter of this environment (the
    versions pyproject.toml pins): a misnamed module or a wrong version would fail the image build too."""
    _, code = _build_check()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=DEPLOY.parent, timeout=600)


@pytest.mark.parametrize("path", PATHS)
def test_each_path_is_complete_on_its_own(path):
    docs = render(path)
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
            for source in c.get("envFrom", []):
                ref = source.get("secretRef")
                if ref:
                    assert ref["name"] in secrets or ref.get("optional") is True, f"{path}: {ref} would block the pod"
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
    specs = list(_ray_cluster_specs(render(path)))
    assert specs
    for _, spec in specs:
        assert str(spec["rayVersion"]) == pinned("ray")
        assert spec["authOptions"]["mode"] == "token"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert _gpu_groups(spec)
        for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            for c in template["spec"]["containers"]:
                assert c["resources"]["limits"]["cpu"] and c["resources"]["limits"]["memory"]


def test_one_cluster_spec_and_one_schedule():
    """The RayCronJob makes deploy/rayjob's RayJob, and the CronJob path's RayCluster runs the same pods."""
    job = _one(render("rayjob"), "RayJob")["spec"]
    cron = _one(render("raycronjob"), "RayCronJob")
    assert cron["spec"]["jobTemplate"] == job
    cluster = _one(render("cronjob"), "RayCluster")["spec"]
    assert cluster["headGroupSpec"] == job["rayClusterSpec"]["headGroupSpec"]
    for ours, theirs in zip(cluster["workerGroupSpecs"], job["rayClusterSpec"]["workerGroupSpecs"], strict=True):
        assert ours["template"] == theirs["template"] and ours["groupName"] == theirs["groupName"]
    plain = _one(render("cronjob"), "CronJob")
    assert plain["spec"]["concurrencyPolicy"] == "Forbid"
    assert plain["spec"]["schedule"] == cron["spec"]["schedule"]


def test_the_job_asks_for_workers_every_path_can_start_from_zero():
    """Issue #28, 1: a cluster that starts with no worker (the launcher's min_workers: 0, the CronJob path's
    RayCluster between runs) gets workers only when the driver asks an autoscaler for them; the job file names
    its actors, so the demand is the whole plan (not whatever node joined first), and each path's autoscaler can
    meet it."""
    from worker.job.resources import demand_bundles

    job = _job_file()
    asks = {k: job.get(k) for k in ("actors", "gpus_per_actor", "cpus_per_actor")}
    assert asks["actors"] and asks["gpus_per_actor"], "job.yaml must name actors and gpus_per_actor"
    bundles = demand_bundles(**asks)

    def fits(resources, count):
        per_node = min(int(resources.get(k, 0) // v) for b in bundles[:1] for k, v in b.items())
        return per_node * count >= len(bundles)

    for path in PATHS:
        for name, spec in _ray_cluster_specs(render(path)):
            groups = _gpu_groups(spec)
            limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups]
            assert any(fits({"CPU": float(lim["cpu"]), "GPU": float(lim["nvidia.com/gpu"])}, g["maxReplicas"])
                       for g, lim in zip(groups, limits)), f"{path}: {name}'s workers cannot hold {bundles}"
            for g in spec["workerGroupSpecs"]:
                if g.get("minReplicas", 0) == 0 or g.get("replicas", 0) == 0:
                    assert spec.get("enableInTreeAutoscaling") is True, f"{path}: {g['groupName']} starts at 0"
    cluster = _one(render("cronjob"), "RayCluster")["spec"]
    assert all(g["minReplicas"] == 0 for g in _gpu_groups(cluster)), "the CronJob path holds GPUs between runs"
    launcher = _launcher()
    workers = {k: v for k, v in launcher["available_node_types"].items() if k != launcher["head_node_type"]}
    assert any(fits(t["resources"], t["max_workers"]) for t in workers.values()), f"the launcher cannot hold {bundles}"
    assert sum(t["max_workers"] for t in workers.values()) <= launcher["max_workers"]


def test_every_pod_has_the_object_stores_credentials():
    """Issue #28, 2: the job file is all s3://, read and written by the head (model, lease, manifests) and the
    workers (read, decode, write tasks): each pod runs as the ServiceAccount of deploy/settings (IRSA, Pod
    Identity, Workload Identity) and each Ray container takes the optional Secret as env; each launcher node has
    an instance profile (Ray gives one to the head only)."""
    job = _job_file()
    assert job["model"].startswith("s3://") and job["output_root"].startswith("s3://")
    for path in PATHS:
        docs = render(path)
        (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
        assert any(k.endswith(("role-arn", "gcp-service-account")) for k in account["metadata"].get("annotations", {}))
        for role, pod in _pod_templates(docs):
            assert pod.get("serviceAccountName") == account["metadata"]["name"], f"{path}: {role}"
            if not role.endswith("head"):  # the autoscaler's Role is bound to this account: keep its token off
                assert pod.get("automountServiceAccountToken") is False, f"{path}: {role} mounts an API token"
            if "submitter" not in role:
                for c in pod["containers"]:
                    refs = [s["secretRef"] for s in c.get("envFrom", []) if "secretRef" in s]
                    assert refs and all(r.get("optional") is True for r in refs), f"{path}: {role} {c['name']}"
    for name, node_type in _launcher()["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile", {}).get("Arn"), f"launcher {name}"


def test_the_cronjob_submitter_follows_the_ray_job_it_submitted():
    """Issue #28, 3: as KubeRay's own submitter, status || submit --no-wait --submission-id; logs --follow, with
    the Kubernetes Job's name as the id (a retried pod finds its run instead of submitting a second one that
    exits 'not started'), success only if that Ray job succeeded, and the Ray job bounded by itself (a pod's
    deadline never stops it)."""
    docs = render("cronjob")
    container, script = _cron_script(docs)
    subprocess.run(["bash", "-n", "-c", script], check=True)
    env = {e["name"]: e for e in container["env"]}
    assert env["SUBMISSION_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/job-name']"
    status = script.index('ray job status "$SUBMISSION_ID"')
    argv = _submit_argv(script)
    assert script.index("ray job submit") > status
    assert "--no-wait" in argv and argv[argv.index("--submission-id") + 1] == "$SUBMISSION_ID"
    assert script.index('ray job logs --follow "$SUBMISSION_ID"') > script.index("ray job submit")
    assert 'SUCCEEDED' in script.split("ray job logs --follow")[1], "the Job must fail when its Ray job failed"
    entrypoint = argv[argv.index("--") + 1:]
    assert entrypoint[0] == "timeout" and int(entrypoint[1]) > 0, entrypoint
    deadline = _one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert int(entrypoint[1]) + 1800 <= deadline, "the Ray job's own bound must end before the pod's deadline"
    assert "--working-dir" not in argv, "the head's image has the code; nothing to upload"


def _derived_names(docs):
    """Names KubeRay and Kubernetes derive from a path's objects, as (kind, name or prefix + '*')."""
    names = set()
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "RayCluster":
            names |= {("Service", f"{name}-head-svc"), ("Secret", name), ("RayCluster", name)}
        elif kind == "RayJob":  # its head service is named after the RayJob; its submitter Job too
            names |= {("Service", f"{name}-head-svc"), ("Job", name), ("RayJob", name), ("RayCluster", f"{name}-*"),
                      ("Secret", f"{name}-*")}
        elif kind == "RayCronJob":  # RayJobs "<name>-<5 letters>", and all that they derive
            names |= {("RayJob", f"{name}-*"), ("Service", f"{name}-*"), ("Job", f"{name}-*"),
                      ("RayCluster", f"{name}-*"), ("Secret", f"{name}-*")}
        elif kind == "CronJob":
            names |= {("CronJob", name), ("Job", f"{name}-*")}
    return names


def _clash(a, b):
    (ka, na), (kb, nb) = a, b
    if ka != kb:
        return False
    pa, pb = na.rstrip("*"), nb.rstrip("*")
    return na == nb or (na.endswith("*") and nb.startswith(pa)) or (nb.endswith("*") and na.startswith(pb))


def test_no_two_paths_share_a_name_kuberay_derives():
    """Issue #28, 4: the paths can share a namespace: KubeRay names a RayJob's head service after the RayJob and a
    RayCluster's after the cluster, so equal names would make one service whose selector KubeRay keeps
    rewriting; and the CronJob submits to its own cluster's service."""
    derived = {path: _derived_names(render(path)) for path in PATHS}
    for i, a in enumerate(PATHS):
        for b in PATHS[i + 1:]:
            clashes = [(x, y) for x in derived[a] for y in derived[b] if _clash(x, y)]
            assert not clashes, f"{a} and {b} both make {clashes}"
    docs = render("cronjob")
    env = {e["name"]: e.get("value") for e in _cron_script(docs)[0]["env"]}
    host = re.match(r"http://([^:/]+):8265$", env["RAY_ADDRESS"]).group(1)
    assert host == f"{_one(docs, 'RayCluster')['metadata']['name']}-head-svc"


def test_run_deadlines_end_before_the_next_trigger():
    """Issue #28, 5: a run that uses its whole deadline must not still hold the lease (and, on the RayCronJob
    path, a 2-GPU cluster) at the next trigger: deadline, start-up allowance and clean-up under the period."""
    one = _one(render("rayjob"), "RayJob")["spec"]
    assert one["shutdownAfterJobFinishes"] is True and 0 < one["ttlSecondsAfterFinished"] <= 600
    assert isinstance(one["backoffLimit"], int) and one["backoffLimit"] >= 0
    cron = _one(render("raycronjob"), "RayCronJob")["spec"]
    period = _period_s(cron["schedule"])
    job = cron["jobTemplate"]
    # each RayJob-level retry brings up a new cluster, and may start the deadline again
    attempts = 1 + job["backoffLimit"]
    assert attempts * job["activeDeadlineSeconds"] + job["ttlSecondsAfterFinished"] + 3600 <= period
    plain = _one(render("cronjob"), "CronJob")["spec"]
    period = _period_s(plain["schedule"])
    spec = plain["jobTemplate"]["spec"]
    assert spec["activeDeadlineSeconds"] + plain["startingDeadlineSeconds"] + 1800 <= period
    bound = _submit_argv(_cron_script(render("cronjob"))[1])
    assert int(bound[bound.index("timeout") + 1]) < spec["activeDeadlineSeconds"]


def _submit_lines():
    """Every `ray job submit` an operator is told to run: the deploy guide and cluster.yaml's header."""
    section = (DEPLOY.parent / "docs" / "guide" / "deploy.md").read_text()
    lines = [m.strip("`") for m in re.findall(r"`[^`]*ray job submit [^`]* -- [^`]*`", section)]
    header = "".join(ln.lstrip("# ") for ln in (DEPLOY / "cluster.yaml").read_text().splitlines(keepends=True)
                     if ln.startswith("#")).replace("\\\n", " ")
    lines += [ln.strip() for ln in header.splitlines() if "ray job submit" in ln]
    return lines


def test_every_client_command_sends_the_token_to_an_address():
    """Issue #28, 6: Ray 2.60's job client sends the token only with RAY_AUTH_MODE=token; a command names its
    address, and uploads the job file alone or a working dir whose runtime env keeps virtual environments out."""
    lines = _submit_lines()
    assert len(lines) >= 2, lines
    excludes = yaml.safe_load((DEPLOY / "runtime-env.yaml").read_text())["excludes"]
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "RAY_AUTH_MODE=token", line
        assert "--address" in argv and argv[argv.index("--address") + 1].startswith("http://127.0.0.1:"), line
        if "--working-dir" in argv and argv[argv.index("--working-dir") + 1] != "deploy/settings":
            assert "--runtime-env" in argv, line
        module = argv[argv.index("--") + 1:]
        assert module[:3] == ["python", "-m", "jobs.scheduled"], line
    assert ".venv/" in excludes and "venv/" in excludes


def test_the_cluster_launcher_opens_nothing():
    """Issue #28, 7: the security group Ray creates opens SSH to 0.0.0.0/0 (whatever provider.security_group
    adds), so every node names its own group; private addresses; a named AMI, not Ray's end-of-life default."""
    cluster = _launcher()
    assert cluster["docker"]["image"] == _image()
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cluster["worker_start_ray_commands"])
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"]["CPU"] == 0
    assert cluster["provider"].get("use_internal_ips") is True
    for name, node_type in cluster["available_node_types"].items():
        config = node_type["node_config"]
        for key in ("SecurityGroupIds", "SubnetIds", "ImageId"):
            assert config.get(key), f"launcher {name}: no {key}"
        assert config["InstanceType"] in NODE_TYPES
    for rule in cluster["provider"].get("security_group", {}).get("IpPermissions", []):
        for cidr in rule.get("IpRanges", []):
            assert ipaddress.ip_network(cidr["CidrIp"]).is_private, rule


_ALLOWED_VOLUMES = {"name", "configMap", "emptyDir", "secret", "projected", "downwardAPI",
                    "persistentVolumeClaim", "ephemeral", "csi"}


def restricted_violations(pod: dict, extra_containers=()) -> list[str]:
    """What the ``restricted`` Pod Security Standard rejects in a pod spec (the checks its fields can fail)."""
    out = []
    pod_sc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(key)
    for volume in pod.get("volumes", []):
        if set(volume) - _ALLOWED_VOLUMES:
            out.append(f"volume {volume['name']}: {set(volume) - _ALLOWED_VOLUMES}")
    containers = [*pod.get("containers", []), *pod.get("initContainers", [])]
    for c in [*containers, *extra_containers]:
        sc = c.get("securityContext", {})
        name = c.get("name", "container")
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities do not drop ALL")
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            out.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        profile = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if profile not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {profile}")
    return out


def test_pods_are_admitted_under_the_restricted_pod_security_standard():
    """Issue #28, 8: every pod, KubeRay's autoscaler sidecar included (KubeRay copies the Ray container's
    securityContext to the init container it adds)."""
    for path in PATHS:
        docs = render(path)
        sidecars = [{"name": f"{name} autoscaler", **spec.get("autoscalerOptions", {})}
                    for name, spec in _ray_cluster_specs(docs) if spec.get("enableInTreeAutoscaling")]
        for role, pod in _pod_templates(docs):
            extra = sidecars if role.endswith("head") else []
            assert not restricted_violations(pod, extra), f"{path} {role}: {restricted_violations(pod, extra)}"


def test_gpu_workers_fit_the_node_type_they_select():
    """Issue #28, 8: a request of all of a node's vCPUs fits no node (allocatable is less); the CPUs per GPU
    follow the docs' sizing; the launcher's workers are the same node type."""
    types = set()
    for path in PATHS:
        for name, spec in _ray_cluster_specs(render(path)):
            for group in _gpu_groups(spec):
                pod = group["template"]["spec"]
                node_type = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
                types.add(node_type)
                vcpus, memory_gib, gpus = NODE_TYPES[node_type]
                (c,) = pod["containers"]
                requests = c["resources"]["requests"]
                cpu, gpu = float(requests["cpu"]), int(requests["nvidia.com/gpu"])
                assert requests == c["resources"]["limits"], f"{path} {name}: requests and limits differ"
                assert gpu <= gpus and cpu <= vcpus - 1, f"{path} {name}: {requests} fits no {node_type}"
                assert cpu / gpu >= 1 + DECODE_CPUS_PER_GPU, f"{path} {name}: too few decode CPUs per GPU"
                assert int(requests["memory"].removesuffix("Gi")) <= 0.85 * memory_gib
                assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    launcher = _launcher()
    workers = [t for k, t in launcher["available_node_types"].items() if k != launcher["head_node_type"]]
    assert {t["node_config"]["InstanceType"] for t in workers} == types
    for t in workers:
        vcpus, _, gpus = NODE_TYPES[t["node_config"]["InstanceType"]]
        assert t["resources"] == {"CPU": vcpus, "GPU": gpus}


def test_schedules_are_read_in_utc():
    """Issue #28, 8: the deploy guide promises 02:30 UTC. The CronJob says so (timeZone); the RayCronJob is read in the
    operator's zone (UTC in KubeRay's image), with no TZ= prefix, which later KubeRay versions reject."""
    plain = _one(render("cronjob"), "CronJob")["spec"]
    assert plain["timeZone"] in ("Etc/UTC", "UTC")
    assert "TZ" not in _one(render("raycronjob"), "RayCronJob")["spec"]["schedule"]
    assert "02:30 UTC" in GUIDE


@pytest.mark.parametrize("version", ["1.33", "1.37"])
@pytest.mark.parametrize("path", PATHS)
def test_core_objects_validate_against_the_kubernetes_schema(path, version):
    """Core objects, and every pod template inside KubeRay's objects (its CRDs embed the core pod schema, so a
    misspelt securityContext or nodeSelector field would be pruned or refused there), in the core schema."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(path)
    core = [d for d in docs if d["apiVersion"] in ("v1", "batch/v1")]
    assert {d["kind"] for d in core} >= {"ConfigMap", "ServiceAccount"}
    pods = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": {"spec": spec}}
            for _, spec in _pod_templates(docs)]
    for doc in core + pods:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("name", sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.yaml")))
def test_nothing_is_exposed_publicly(name):
    for doc in _load(DEPLOY / name):
        assert doc.get("kind") not in ("Ingress", "Route")
        assert not (doc.get("kind") == "Service" and doc["spec"].get("type") in ("LoadBalancer", "NodePort"))
        assert "0.0.0.0" not in yaml.safe_dump(doc)
