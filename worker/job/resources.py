"""How many explain actors, and what each asks of Ray: planned from what each *node* can hold.

An actor must fit on one node, so the plan is made from the alive nodes'
resources (``ray.nodes()``), not the cluster's sum: on a cluster of a 1-CPU
head and a 2-CPU worker, an actor of 2.25 CPUs fits nowhere and would wait
forever.  By default:

- with GPUs: one actor per GPU (on every node that has one), 1 CPU each;
- CPU only: actors as large as the largest node allows after its share of the
  decode reserve, as many as the nodes hold, so the CPUs left serve reading and
  decoding (``decode_cpus``, default a quarter of the cluster's CPUs, at least 0.5).

While no node can hold the plan (a cluster whose workers scale from zero, nodes
still joining), a pending placement group asks the autoscaler for the actors
(:func:`demand_bundles`) and the driver waits, up to the start time-out.  A plan
that still cannot be placed then fails with a message naming what was asked and
the largest node.  TensorFlow's thread pools
are sized to the CPUs an actor was given, so Ray's accounting and the threads
that really run agree.

Example (a 1-CPU head and a 2-CPU worker):
    >>> plan = plan_actors([{"CPU": 1.0}, {"CPU": 2.0}])
    >>> plan.actors, plan.num_cpus, plan.num_gpus
    (1, 1.5, 0.0)
    >>> plan_actors([{"CPU": 1.0}, {"CPU": 2.0}], cpus_per_actor=2.25)
    Traceback (most recent call last):
    ...
    worker.job.resources.PlacementError: an explain actor asks for 2.25 CPUs and 0 GPUs, but the largest node has 2 CPUs and 0 GPUs (nodes: 1 CPU, 2 CPU); lower --cpus-per-actor
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from dataclasses import dataclass

EPS = 1e-9


class PlacementError(ValueError):
    """The actors asked for cannot be placed on the cluster's nodes."""


class BadActorRequest(PlacementError):
    """An ask no cluster can satisfy, however long one waits (a configuration error)."""


class ActorStartError(RuntimeError):
    """Nodes that could hold the actors stayed busy past the start time-out."""


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    num_cpus: float
    num_gpus: float
    threads: int
    decode_cpus_per_task: float

    def describe(self) -> dict:
        return self.__dict__.copy()


def connect(logging_level=logging.WARNING) -> None:
    """Attach to the cluster in RAY_ADDRESS (or one ``ray start`` made here), or start a lean local one: no
    dashboard (seconds of start-up and a process the job does not need; start ``ray start --head`` and set
    RAY_ADDRESS for one), and no runtime environment: the workers inherit this process's environment, so the
    workers Ray starts in advance serve the first tasks and the actor (a runtime environment, even of
    environment variables alone, makes Ray start new worker processes for them: ~4 s of a short run here)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not os.environ.get("RAY_ADDRESS"):
        # a Ray started here keeps a few idle workers more than its CPUs: the job's processes (the actors, the
        # read/decode and write tasks, Ray Data's own actors) outnumber a small machine's CPUs, and past that
        # number Ray kills a worker idle for a second and starts a new one for the next task (a second or two
        # of CPU each: 45 of them in a 1 million-row run on 2 cores). Read by the raylet this process starts.
        os.environ.setdefault("RAY_num_workers_soft_limit", str((os.cpu_count() or 1) + 8))
        try:
            ray.init(logging_level=logging_level, include_dashboard=False)
            return
        except ValueError as exc:  # a cluster ``ray start`` made here: it decides about its dashboard
            if "dashboard" not in str(exc):
                raise
    env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": os.environ["TF_CPP_MIN_LOG_LEVEL"]}}
    ray.init(logging_level=logging_level, runtime_env=env)


def starts_embedded() -> bool:
    """Whether :func:`connect` would start a local Ray (or attach to one ``ray start`` made here) rather than
    attach to RAY_ADDRESS or find one running in this process. It does not import Ray (a second of CPU that
    :func:`connect_beside` overlaps with the driver's own work): Ray not imported yet is Ray not running."""
    ray = sys.modules.get("ray")
    return not os.environ.get("RAY_ADDRESS") and not (ray is not None and ray.is_initialized())


def connect_beside(work):
    """``work()``'s result, computed in a thread while :func:`connect` runs on this one (``ray.init`` wants the
    main thread), so the seconds of a local Ray's start overlap the driver's own (TensorFlow's import, the probe
    engine). If ``work`` raises, a Ray this call started is shut down before the error is raised: a bad
    configuration still leaves no cluster behind. When both fail, ``work``'s error is the one raised."""
    box: dict = {}

    def target():
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="driver-probe", daemon=True)
    thread.start()
    import ray  # its import overlaps the work too

    started_here = not ray.is_initialized()
    try:
        connect()
    except BaseException:
        thread.join()
        if "error" in box:
            raise box["error"] from None
        raise
    thread.join()
    if "error" in box:
        if started_here:
            ray.shutdown()
        raise box["error"]
    return box["value"]


def alive_nodes() -> list[dict]:
    """The resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _fits(node: dict, cpus: float, gpus: float) -> int:
    """How many actors of (cpus, gpus) one node holds."""
    counts = []
    if cpus > 0:
        counts.append(math.floor(float(node.get("CPU", 0)) / cpus + EPS))
    if gpus > 0:
        counts.append(math.floor(float(node.get("GPU", 0)) / gpus + EPS))
    return min(counts) if counts else 0


def _fmt(x: float) -> str:
    return f"{x:g}"


def _nodes_text(nodes: list[dict]) -> str:
    parts = [f"{_fmt(float(n.get('CPU', 0)))} CPU" + (f" {_fmt(float(n['GPU']))} GPU" if n.get("GPU") else "")
             for n in nodes]
    return ", ".join(parts[:8]) + (f", ... ({len(parts)} nodes)" if len(parts) > 8 else "")


def describe_request(cpus: float, gpus: float, nodes: list[dict]) -> str:
    """'asks for X CPUs and Y GPUs, but the largest node has ...': for placement errors and time-outs."""
    largest = max(nodes, key=lambda n: (float(n.get("GPU", 0)), float(n.get("CPU", 0))), default={})
    return (f"an explain actor asks for {_fmt(cpus)} CPUs and {_fmt(gpus)} GPUs, but the largest node has "
            f"{_fmt(float(largest.get('CPU', 0)))} CPUs and {_fmt(float(largest.get('GPU', 0)))} GPUs "
            f"(nodes: {_nodes_text(nodes)})")


def plan_actors(nodes: list[dict], *, actors: int | None = None, gpus_per_actor: float | None = None,
                cpus_per_actor: float | None = None, decode_cpus: float | None = None,
                gpu_memory_limit_mb: int | None = None) -> ActorPlan:
    """Decide the actor pool for the alive ``nodes`` (a list of per-node resource dicts)."""
    if isinstance(nodes, dict):  # one node given as a resource dict
        nodes = [nodes]
    nodes = [n for n in nodes if float(n.get("CPU", 0)) > 0 or float(n.get("GPU", 0)) > 0]
    if not nodes:
        raise PlacementError("the Ray cluster has no node with CPUs or GPUs")
    total_cpus = sum(float(n.get("CPU", 0)) for n in nodes)
    total_gpus = sum(float(n.get("GPU", 0)) for n in nodes)
    largest_cpus = max(float(n.get("CPU", 0)) for n in nodes)
    reserve = decode_cpus if decode_cpus is not None else max(0.5, total_cpus / 4)
    decode_task = min(0.5, reserve)
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if total_gpus >= 1 else 0.0
    if gpus_per_actor:
        if gpus_per_actor < 1 and not gpu_memory_limit_mb:
            raise BadActorRequest("fractional GPUs per actor need gpu_memory_limit_mb (a hard TensorFlow memory "
                                 "limit), or actors sharing a GPU will each try to take all of its memory")
        cpus = cpus_per_actor if cpus_per_actor is not None else 1.0
        room = sum(_fits(n, cpus, gpus_per_actor) for n in nodes)
        if room == 0:
            raise PlacementError(describe_request(cpus, gpus_per_actor, nodes) + "; lower --gpus-per-actor or "
                                 "--cpus-per-actor")
        n = actors or room
        if n > room:
            raise PlacementError(f"{n} actors of {_fmt(cpus)} CPUs and {_fmt(gpus_per_actor)} GPUs do not fit: the "
                                 f"nodes hold {room} (nodes: {_nodes_text(nodes)})")
        return ActorPlan(n, cpus, gpus_per_actor, max(1, math.ceil(cpus)), decode_task)

    available = total_cpus - reserve
    if cpus_per_actor is None:
        # as large as the largest node allows after its share of the reserve, but no more than actors need
        share = largest_cpus * (1 - reserve / total_cpus)
        cpus_per_actor = max(0.5, min(share, available / actors if actors else share))
        cpus_per_actor = math.floor(cpus_per_actor * 4 + EPS) / 4 or 0.25
    room = sum(_fits(n, cpus_per_actor, 0) for n in nodes)
    if room == 0:
        raise PlacementError(describe_request(cpus_per_actor, 0, nodes) + "; lower --cpus-per-actor")
    n = actors or max(1, min(room, math.floor(available / cpus_per_actor + EPS)))
    if n > room:
        raise PlacementError(f"{n} actors of {_fmt(cpus_per_actor)} CPUs do not fit: the nodes hold {room} "
                             f"(nodes: {_nodes_text(nodes)}); lower --actors or --cpus-per-actor")
    if cpus_per_actor * n > available + EPS:
        raise PlacementError(f"{n} actors x {_fmt(cpus_per_actor)} CPUs leave less than {_fmt(reserve)} of the "
                             f"cluster's {_fmt(total_cpus)} CPUs for reading and decoding")
    return ActorPlan(n, cpus_per_actor, 0.0, max(1, math.ceil(cpus_per_actor)), decode_task)


def demand_bundles(*, actors: int | None = None, gpus_per_actor: float | None = None,
                   cpus_per_actor: float | None = None, **_) -> list[dict]:
    """What to ask an autoscaler for while no node can hold the plan (a cluster scaled to zero, nodes still
    starting): ``actors`` bundles of the actor's ask when the job names them, else one actor of 1 CPU (and the
    GPUs per actor asked for). The plan itself is then made from the nodes that joined.

    >>> demand_bundles(actors=2, gpus_per_actor=1)
    [{'CPU': 1.0, 'GPU': 1.0}, {'CPU': 1.0, 'GPU': 1.0}]
    >>> demand_bundles()
    [{'CPU': 1.0}]
    """
    bundle = {"CPU": float(cpus_per_actor if cpus_per_actor is not None else 1.0)}
    if gpus_per_actor:
        bundle["GPU"] = float(gpus_per_actor)
    return [dict(bundle) for _ in range(actors or 1)]


def place_actors(timeout_s: float, echo=print, **asks) -> ActorPlan:
    """Plan the actors (:func:`plan_actors`) from the connected cluster's alive nodes and check that their
    resources can be reserved now.  While no plan fits (no nodes yet, nodes still joining) a placement group of
    :func:`demand_bundles` is left pending: an autoscaler (the cluster launcher's, KubeRay's in-tree one) sees
    it as demand and starts nodes; polling ``ray.nodes()`` alone asks for nothing, so a cluster scaled to zero
    would stay at zero. (A placement group, not ``request_resources``: it goes with this driver, so a killed
    driver leaves no standing request that keeps GPU nodes up.) While no plan fits or the nodes are busy, wait,
    up to ``timeout_s`` in all; then fail saying what was asked and what the largest node has.  Ray Data itself
    would wait for its actors forever."""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    deadline = time.monotonic() + timeout_s
    demand, asked = None, ""
    try:
        while True:
            try:
                plan = plan_actors(alive_nodes(), **asks)
                break
            except BadActorRequest:
                raise
            except PlacementError as exc:
                if demand is None:
                    bundles = demand_bundles(**asks)
                    demand = placement_group(bundles, strategy="PACK")
                    asked = f"{len(bundles)} x " + " ".join(f"{_fmt(v)} {k}" for k, v in bundles[0].items())
                    echo(f"waiting up to {timeout_s:g} s for nodes that can hold the actors ({exc}); an "
                         f"autoscaler, if the cluster has one, is asked for {asked}")
                if time.monotonic() > deadline:
                    raise PlacementError(f"{exc} (after {timeout_s:g} s; an autoscaler, if the cluster has one, was "
                                         f"asked for {asked} and started no node that holds it: check its node "
                                         "types and worker limits with `ray status`, or raise "
                                         "--actor-start-timeout)") from None
                time.sleep(2)
    finally:
        if demand is not None:
            remove_placement_group(demand)
    bundle = {"CPU": plan.num_cpus, **({"GPU": plan.num_gpus} if plan.num_gpus else {})}
    group = placement_group([bundle] * plan.actors, strategy="PACK")  # reserved and released at once
    try:
        ray.get(group.ready(), timeout=max(1.0, deadline - time.monotonic()))
    except ray.exceptions.GetTimeoutError:
        raise ActorStartError(
            f"{plan.actors} explain actor(s) could not be placed within {timeout_s:g} s: "
            f"{describe_request(plan.num_cpus, plan.num_gpus, alive_nodes())}, and the nodes that could hold them "
            "are busy. Wait for other work to finish, raise --actor-start-timeout, or lower --actors / "
            "--cpus-per-actor") from None
    finally:
        remove_placement_group(group)
    return plan
