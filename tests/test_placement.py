"""Placement of the PPO roles: pure planning and feasibility checks, then a real 3-node Ray cluster on loopback.

The cluster is a head node without GPUs and two worker nodes declaring 2 (fake) GPUs and 2 CPUs each; Ray accepts
declared GPUs and hands out their ids, which is all placement needs.
"""

import time

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from rlhf.placement import (
    COLOCATE_MODES,
    PlacementError,
    RoleLayout,
    assign_nodes,
    check_resources,
    create_placements,
    describe_actor,
    placement_table,
    plan_device_groups,
    remove_placements,
)


def layouts(num_nodes=1, devices_per_node=2, roles=("actor", "critic", "reference", "reward"), **overrides):
    """Same layout for every role, except roles given as role=(num_nodes, devices_per_node)."""
    out = {role: RoleLayout(role, num_nodes, devices_per_node) for role in roles}
    out.update({role: RoleLayout(role, *shape) for role, shape in overrides.items()})
    return out


def fake_node(ip, gpus, cpus, alive=True):
    return {"NodeID": f"id-{ip}", "NodeManagerAddress": ip, "Alive": alive, "Resources": {"GPU": gpus, "CPU": cpus}}


# ---------------------------------------------------------------------------------------------------------------
# Planning (pure)


@pytest.mark.parametrize(
    "colocate, expected",
    [
        ("none", [["actor"], ["critic"], ["reference"], ["reward"]]),
        ("reference_with_actor", [["actor", "reference"], ["critic"], ["reward"]]),
        ("reward_with_critic", [["actor"], ["critic", "reward"], ["reference"]]),
        ("both", [["actor", "reference"], ["critic", "reward"]]),
        ("all", [["actor", "critic", "reference", "reward"]]),
    ],
)
def test_plan_groups_roles_by_colocation(colocate, expected):
    given = layouts()
    groups = plan_device_groups(given, colocate)
    assert [roles for _, roles in groups] == expected
    assert [layout for layout, _ in groups] == [given[roles[0]] for roles in expected]


def test_plan_places_only_the_roles_given():
    groups = plan_device_groups(layouts(roles=("actor", "reference")), "all")  # e.g. GRPO: no critic, no reward model
    assert [roles for _, roles in groups] == [["actor", "reference"]]


def test_colocated_roles_need_the_same_layout():
    with pytest.raises(PlacementError, match=r"reference.*actor.*same layout.*reference has 1 node\(s\) x 4"):
        plan_device_groups(layouts(reference=(1, 4)), "reference_with_actor")
    with pytest.raises(PlacementError, match="reward.*critic"):
        plan_device_groups(layouts(reward=(2, 2)), "both")
    plan_device_groups(layouts(reference=(1, 4)), "reward_with_critic")  # reference is not colocated there


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="colocate must be one of"):
        plan_device_groups(layouts(), "actor_with_reward")
    with pytest.raises(PlacementError, match="no critic"):
        plan_device_groups(layouts(roles=("actor", "reward")), "reward_with_critic")
    with pytest.raises(ValueError, match="unknown role"):
        plan_device_groups({"policy": RoleLayout("policy", 1, 1)}, "none")
    with pytest.raises(ValueError, match="devices_per_node"):
        RoleLayout("actor", 1, 0)
    assert "all" in COLOCATE_MODES


def test_check_resources_names_role_and_counts():
    nodes = [fake_node("10.0.0.1", gpus=8, cpus=64), fake_node("10.0.0.2", gpus=2, cpus=64)]
    with pytest.raises(PlacementError) as err:
        check_resources(layouts(2, 4, roles=("actor",)), "none", use_gpu=True, nodes=nodes)
    message = str(err.value)
    assert message.startswith("actor: needs 2 nodes with 4 GPU each")
    assert "the cluster has 1 node with >= 4 GPU" in message
    assert "10.0.0.1 GPU=8 CPU=64" in message and "10.0.0.2 GPU=2 CPU=64" in message


def test_check_resources_counts_what_earlier_groups_took():
    nodes = [fake_node(f"10.0.0.{i}", gpus=4, cpus=16) for i in (1, 2)]
    check_resources(layouts(2, 4), "all", use_gpu=True, nodes=nodes)  # one group of 8 GPUs fits exactly
    with pytest.raises(PlacementError, match=r"critic\+reward: needs 2 nodes .* 0 nodes .* left after placing actor"):
        check_resources(layouts(2, 4), "both", use_gpu=True, nodes=nodes)


def test_check_resources_gpu_needs_a_cpu_and_skips_dead_nodes():
    starved = [fake_node("10.0.0.1", gpus=8, cpus=2)]
    with pytest.raises(PlacementError, match="each GPU also takes 1 CPU"):
        check_resources(layouts(1, 4, roles=("actor",)), "none", use_gpu=True, nodes=starved)
    check_resources(layouts(1, 2, roles=("actor",)), "none", use_gpu=False, nodes=starved)  # CPU slots only
    dead = [fake_node("10.0.0.1", gpus=8, cpus=8, alive=False)]
    with pytest.raises(PlacementError, match="0 nodes"):
        check_resources(layouts(1, 1, roles=("actor",)), "none", use_gpu=True, nodes=dead)


def test_assign_nodes_spreads_each_group_and_keeps_big_nodes_for_big_groups():
    nodes = [fake_node("big", gpus=8, cpus=8), fake_node("a", gpus=2, cpus=8), fake_node("b", gpus=2, cpus=8)]
    groups = plan_device_groups(layouts(actor=(1, 8), critic=(2, 2), roles=()), "none")
    assert assign_nodes(groups, use_gpu=True, nodes=nodes) == [["id-big"], ["id-a", "id-b"]]


def test_placement_table_sorts_by_role_then_rank():
    rows = [
        {"role": "reward", "rank": 0, "node_ip": "10.0.0.2", "node_id": "n2", "devices": "0"},
        {"role": "actor", "rank": 1, "node_ip": "10.0.0.1", "node_id": "n1", "devices": "1"},
        {"role": "critic", "rank": 0, "node_ip": "10.0.0.2", "node_id": "n2", "devices": "cpu"},
        {"role": "actor", "rank": 0, "node_ip": "10.0.0.1", "node_id": "n1", "devices": "0", "zero_stage": 3},
    ]
    lines = placement_table(rows).splitlines()
    assert lines[0].split() == ["role", "rank", "node_ip", "node_id", "devices", "zero_stage"]
    expected = [["actor", "0"], ["actor", "1"], ["critic", "0"], ["reward", "0"]]
    assert [line.split()[:2] for line in lines[1:]] == expected
    assert [line.split()[-1] for line in lines[1:]] == ["3", "-", "-", "-"]
    assert all(line.index("10.0.0") == lines[0].index("node_ip") for line in lines[1:])  # fixed-width columns


# ---------------------------------------------------------------------------------------------------------------
# A real Ray cluster on loopback (conftest sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which makes Ray resolve this
# machine's address to 127.0.0.1 instead of the first network interface)

GPU_NODES, GPUS_PER_NODE = 2, 2


@pytest.fixture(scope="module")
def cluster(request):
    local = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024**2}
    started = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False, **local}
    )
    request.addfinalizer(started.shutdown)
    for _ in range(GPU_NODES):
        started.add_node(num_cpus=GPUS_PER_NODE, num_gpus=GPUS_PER_NODE, **local)
    ray.init(address=started.address, _node_ip_address="127.0.0.1")
    request.addfinalizer(ray.shutdown)  # finalizers run last-in first-out: ray.shutdown, then the cluster
    return started


@ray.remote(num_cpus=0)
class Probe:
    def where(self):
        return describe_actor()


def probe(placements, role):
    """Start one Probe per rank of `role` and return where each landed, by rank."""
    placement = placements[role]
    actors = [Probe.options(**placement.actor_options(rank)).remote() for rank in range(placement.world_size)]
    return ray.get([actor.where.remote() for actor in actors], timeout=60)


def live_placement_groups():
    return {pg_id for pg_id, info in placement_group_table().items() if info["state"] != "REMOVED"}


def wait_until_all_free(timeout_s=20):
    """Poll until no GPU or CPU is reserved (removal is asynchronous); return what is available then."""
    total = {name: ray.cluster_resources()[name] for name in ("GPU", "CPU")}
    deadline = time.monotonic() + timeout_s
    while True:
        free = {name: ray.available_resources().get(name, 0) for name in total}
        if free == total or time.monotonic() > deadline:
            return free
        time.sleep(0.1)


@pytest.mark.distributed
def test_role_spans_two_nodes_rank_by_node_slot(cluster):
    placements = create_placements(layouts(2, 2, roles=("actor",)), "none", use_gpu=True, timeout_s=30)
    try:
        where = probe(placements, "actor")
        assert where[0]["node_id"] == where[1]["node_id"] != where[2]["node_id"] == where[3]["node_id"]
        assert {w["devices"] for w in where[:2]} == {w["devices"] for w in where[2:]} == {"0", "1"}
        assert {w["node_ip"] for w in where} == {"127.0.0.1"}
        rows = [{"role": "actor", "rank": rank, **w} for rank, w in enumerate(where)]
        print(placement_table(rows))
    finally:
        remove_placements(placements)
    wait_until_all_free()


@pytest.mark.distributed
def test_colocated_reference_shares_the_actor_devices_rank_by_rank(cluster):
    wanted = layouts(2, 2, roles=("actor", "reference"))
    nodes = ray.nodes()
    with pytest.raises(PlacementError):  # two separate groups of 4 GPUs do not fit on 4 GPUs...
        check_resources(wanted, "none", use_gpu=True, nodes=nodes)
    check_resources(wanted, "reference_with_actor", use_gpu=True, nodes=nodes)  # ...one shared group does

    placements = create_placements(wanted, "reference_with_actor", use_gpu=True, timeout_s=30)
    try:
        assert placements["actor"].placement_group == placements["reference"].placement_group
        assert placements["reference"].actor_options(3)["num_gpus"] == 0.5
        actor, reference = probe(placements, "actor"), probe(placements, "reference")
        assert reference == actor  # same node, same GPU, for every rank
        assert len({(w["node_id"], w["devices"]) for w in actor}) == 4  # and no two actor ranks share a GPU
    finally:
        remove_placements(placements)
    wait_until_all_free()


@pytest.mark.distributed
def test_too_many_devices_fails_before_creating_anything(cluster):
    before = live_placement_groups()
    with pytest.raises(PlacementError, match=r"^critic: needs 2 nodes with 2 GPU each; the cluster has 0 nodes"):
        create_placements(layouts(2, 2, roles=("actor", "critic")), "none", use_gpu=True, timeout_s=5)
    assert live_placement_groups() == before


@pytest.mark.distributed
def test_timeout_names_the_roles_and_removes_what_it_made(cluster):
    squatter = placement_group([{"GPU": 1, "CPU": 1}], strategy="PACK")  # someone else holds one GPU
    ray.get(squatter.ready(), timeout=30)
    before = live_placement_groups()
    try:
        with pytest.raises(PlacementError, match=r"^actor\+critic\+reference\+reward: placement group not ready"):
            create_placements(layouts(2, 2), "all", use_gpu=True, timeout_s=2)
        assert live_placement_groups() == before
    finally:
        remove_placement_group(squatter)
    wait_until_all_free()


@pytest.mark.distributed
def test_remove_placements_frees_everything(cluster):
    total = {name: ray.cluster_resources()[name] for name in ("GPU", "CPU")}
    placements = create_placements(layouts(1, 2), "both", use_gpu=True, timeout_s=30)
    assert ray.available_resources().get("GPU", 0) == 0
    cpu_only = create_placements(layouts(1, 1, roles=("actor",)), "none", use_gpu=False, timeout_s=30)
    assert probe(cpu_only, "actor")[0]["devices"] == "cpu"
    remove_placements(placements)
    remove_placements(cpu_only)
    remove_placements(placements)  # a second removal is harmless
    assert wait_until_all_free() == total
