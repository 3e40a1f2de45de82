"""How many explain actors, and what each asks of Ray: GPUs when there are any, CPUs otherwise.

Actors never take every CPU: read and decode tasks keep a share
(``decode_cpus``, default a quarter of the cluster's CPUs, at least 0.5).
TensorFlow's thread pools are sized to the CPUs an actor was given, so Ray's
accounting and the threads that really run agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    num_cpus: float
    num_gpus: float
    threads: int
    decode_cpus_per_task: float

    def describe(self) -> dict:
        return self.__dict__.copy()


def plan_actors(cluster: dict, *, actors: int | None = None, gpus_per_actor: float | None = None,
                cpus_per_actor: float | None = None, decode_cpus: float | None = None,
                gpu_memory_limit_mb: int | None = None) -> ActorPlan:
    """Decide the actor pool for ``cluster`` (``ray.cluster_resources()``)."""
    total_cpus = float(cluster.get("CPU", 1))
    total_gpus = float(cluster.get("GPU", 0))
    reserve = decode_cpus if decode_cpus is not None else max(0.5, total_cpus / 4)
    decode_task = min(0.5, reserve)
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if total_gpus >= 1 else 0.0
    if gpus_per_actor:
        if gpus_per_actor > total_gpus:
            raise ValueError(f"gpus_per_actor={gpus_per_actor} but the cluster has {total_gpus} GPUs")
        if gpus_per_actor < 1 and not gpu_memory_limit_mb:
            raise ValueError("fractional GPUs per actor need gpu_memory_limit_mb (a hard TensorFlow memory "
                             "limit), or actors sharing a GPU will each try to take all of its memory")
        n = actors or int(total_gpus // gpus_per_actor)
        cpus = cpus_per_actor or 1.0
        return ActorPlan(n, cpus, gpus_per_actor, max(1, math.ceil(cpus)), decode_task)
    n = actors or 1
    available = total_cpus - reserve
    if cpus_per_actor is None:
        cpus_per_actor = max(0.5, available / n)
    if cpus_per_actor * n > available + 1e-9:
        raise ValueError(f"{n} actors x {cpus_per_actor} CPUs leave less than {reserve} of the cluster's "
                         f"{total_cpus} CPUs for reading and decoding")
    return ActorPlan(n, cpus_per_actor, 0.0, max(1, math.ceil(cpus_per_actor)), decode_task)
