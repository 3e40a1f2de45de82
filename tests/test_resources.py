"""Actor plans from per-node resources: every default fits a node; asks no node can hold are refused."""

import pytest

from worker.job.resources import PlacementError, plan_actors


def test_one_actor_per_gpu_on_every_gpu_node():
    plan = plan_actors([{"CPU": 0.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert (plan.actors, plan.num_cpus, plan.num_gpus, plan.threads) == (3, 1.0, 1.0, 1)


def test_fractional_gpus_need_a_memory_limit_and_fit_per_node():
    with pytest.raises(PlacementError, match="gpu_memory_limit_mb"):
        plan_actors([{"CPU": 8.0, "GPU": 1.0}], gpus_per_actor=0.5)
    plan = plan_actors([{"CPU": 8.0, "GPU": 1.0}], gpus_per_actor=0.5, gpu_memory_limit_mb=20000)
    assert (plan.actors, plan.num_gpus) == (2, 0.5)
    with pytest.raises(PlacementError, match="asks for 1 CPUs and 2 GPUs, but the largest node has 8 CPUs and 1 GPUs"):
        plan_actors([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], gpus_per_actor=2)


@pytest.mark.parametrize("nodes", [[{"CPU": 2.0}], [{"CPU": 1.0}, {"CPU": 2.0}], [{"CPU": 8.0}] * 4,
                                   [{"CPU": 0.0}, {"CPU": 16.0}, {"CPU": 4.0}]])
def test_cpu_defaults_fit_a_node_and_leave_the_decode_reserve(nodes):
    plan = plan_actors(nodes)
    total = sum(n["CPU"] for n in nodes)
    assert plan.num_cpus <= max(n["CPU"] for n in nodes)  # each actor fits one node
    assert plan.actors * plan.num_cpus <= total - max(0.5, total / 4) + 1e-9  # the decode reserve stays free
    assert plan.actors <= sum(int(n["CPU"] // plan.num_cpus) for n in nodes)
    assert plan.threads >= plan.num_cpus


def test_explicit_asks_are_checked_against_nodes_and_reserve():
    with pytest.raises(PlacementError, match="3 actors of 1 CPUs do not fit: the nodes hold 2"):
        plan_actors([{"CPU": 1.0}, {"CPU": 1.0}], actors=3, cpus_per_actor=1, decode_cpus=0)
    with pytest.raises(PlacementError, match="leave less than 1 of the cluster's 2 CPUs"):
        plan_actors([{"CPU": 2.0}], actors=2, cpus_per_actor=1, decode_cpus=1)
    assert plan_actors([{"CPU": 4.0}], decode_cpus=2).num_cpus == 2
