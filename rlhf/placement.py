"""Where the PPO roles run: plan, check and reserve Ray placement groups for their actor groups.

PPO runs four roles (actor, critic, reference, reward), each a group of Ray actors with one actor per device: a GPU,
or a CPU slot when `use_gpu` is False. A role's `RoleLayout` asks for `num_nodes` distinct nodes with
`devices_per_node` devices each; rank r runs on node slot r // devices_per_node. Colocation (`COLOCATE_MODES`) lets
roles share another role's devices rank by rank: reference rank r on the device of actor rank r, and so on.

How a device group is reserved, and why not one bundle per node: a placement group gets one bundle per *device*,
{"GPU": 1, "CPU": 1} (or {"CPU": 1}), in rank order, and each bundle is pinned to a node chosen up front. With one
bundle per node ({"GPU": d}), roles sharing it ask for fractions of a GPU and Ray's best-fit assignment puts two
fractional actors of the *same* role on one GPU (measured on Ray 2.60: actor ranks 0 and 1 both got GPU 0), so
colocation would break. No Ray strategy says "d bundles on each of n distinct nodes", hence the pinning, through
the per-bundle label selector on the node-id label every node carries (`bundle_label_selector`: used and tested
with Ray 2.60, the oldest Ray that pyproject.toml allows).

The nodes are chosen by `assign_nodes`, the same greedy that `check_resources` runs, so a plan that passes the check
is the plan that gets created. It works on the nodes' *total* resources: the cluster is assumed to be this driver's.
If something else holds the resources, `create_placements` times out with a `PlacementError` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from trainer.contracts import COLOCATE_MODES, ROLES

# Which role joins which, per mode: {guest: host}. The guest runs on the host's devices.
_COLOCATIONS = {
    "none": {},
    "reference_with_actor": {"reference": "actor"},
    "reward_with_critic": {"reward": "critic"},
    "both": {"reference": "actor", "reward": "critic"},
    "all": {"critic": "actor", "reference": "actor", "reward": "actor"},
}
_NODE_ID_LABEL = "ray.io/node-id"  # set by Ray on every node


class PlacementError(RuntimeError):
    """The roles cannot be placed as asked; the message names the roles and what is missing."""


@dataclass(frozen=True)
class RoleLayout:
    role: str
    num_nodes: int
    devices_per_node: int

    def __post_init__(self):
        if self.num_nodes < 1 or self.devices_per_node < 1:
            raise ValueError(
                f"{self.role}: num_nodes and devices_per_node must be >= 1, "
                f"got {self.num_nodes} and {self.devices_per_node}"
            )

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices_per_node


# ---------------------------------------------------------------------------------------------------------------
# Planning (pure)


def plan_device_groups(layouts: dict[str, RoleLayout], colocate: str) -> list[tuple[RoleLayout, list[str]]]:
    """The distinct sets of devices to reserve, each with the roles that share it (host role first).

    Groups come in role order (actor, critic, reference, reward); a group's layout is its host role's. Only the
    roles in `layouts` are placed; a colocation mode must find the roles it pairs (except that "all" puts whichever
    roles are given on the actor's devices).
    """
    if colocate not in COLOCATE_MODES:
        raise ValueError(f"colocate must be one of {COLOCATE_MODES}, got {colocate!r}")
    for key, layout in layouts.items():
        if key not in ROLES:
            raise ValueError(f"unknown role {key!r}; roles are {ROLES}")
        if layout.role != key:
            raise ValueError(f"layouts[{key!r}] describes role {layout.role!r}")

    pairs = _COLOCATIONS[colocate]
    hosts: dict[str, list[str]] = {}  # host role -> roles sharing its devices
    for role in ROLES:
        if role not in layouts:
            continue
        host = pairs.get(role)
        if host is None:  # hosts precede their guests in ROLES, so the host is always first in its list
            hosts[role] = [role]
            continue
        if host not in layouts:
            raise PlacementError(f"colocate={colocate!r} puts {role} on the {host}'s devices, but there is no {host}")
        mine, theirs = layouts[role], layouts[host]
        if (mine.num_nodes, mine.devices_per_node) != (theirs.num_nodes, theirs.devices_per_node):
            raise PlacementError(
                f"colocate={colocate!r} puts {role} on the {host}'s devices, so they need the same layout: "
                f"{role} has {mine.num_nodes} node(s) x {mine.devices_per_node}, "
                f"{host} has {theirs.num_nodes} node(s) x {theirs.devices_per_node}"
            )
        hosts[host].append(role)
    return [(layouts[host], roles) for host, roles in hosts.items()]


def _device_bundle(use_gpu: bool) -> dict[str, float]:
    """Resources reserved per device. A GPU also reserves one CPU for the processes driving it."""
    return {"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": 1.0}


def _node_capacity(resources: dict, bundle: dict[str, float]) -> int:
    """How many device bundles fit on a node with these total resources."""
    return min(math.floor(resources.get(name, 0.0) / amount + 1e-9) for name, amount in bundle.items())


def _describe_node(node: dict) -> str:
    resources = node["Resources"]
    shown = " ".join(f"{name}={resources.get(name, 0):g}" for name in ("GPU", "CPU"))
    return f"{node['NodeManagerAddress']} {shown}"


def assign_nodes(groups: list[tuple[RoleLayout, list[str]]], use_gpu: bool, nodes: list[dict]) -> list[list[str]]:
    """Choose the node of each node slot of each device group, or raise PlacementError; pure, on `ray.nodes()`.

    Returns, per group (same order as `groups`), the node IDs of its `num_nodes` slots, all distinct.

    The check is a simple greedy, not an exhaustive search: groups with the most devices per node go first, each
    takes the `num_nodes` alive nodes with the fewest devices still free that fit it (best fit, keeping big nodes
    for later groups). A node's devices are its total resources divided by `_device_bundle` (a GPU counts only
    with a CPU to go with it). It can reject a layout that a cleverer packing would fit, never the reverse.
    """
    bundle = _device_bundle(use_gpu)
    unit = "GPU" if use_gpu else "CPU"
    alive = [node for node in nodes if node.get("Alive", True)]
    free = {node["NodeID"]: _node_capacity(node["Resources"], bundle) for node in alive}
    order = sorted(range(len(groups)), key=lambda i: (-groups[i][0].devices_per_node, -groups[i][0].num_nodes))
    chosen: dict[int, list[str]] = {}
    placed: list[str] = []
    for i in order:
        layout, roles = groups[i]
        need = layout.devices_per_node
        fitting = sorted((node_id for node_id, n in free.items() if n >= need), key=lambda node_id: free[node_id])
        if len(fitting) < layout.num_nodes:
            left = f" left after placing {', '.join(placed)}" if placed else ""
            listing = ", ".join(_describe_node(node) for node in alive) or "none alive"
            cpu_note = "; each GPU also takes 1 CPU" if use_gpu else ""
            raise PlacementError(
                f"{'+'.join(roles)}: needs {_count(layout.num_nodes, 'node')} with {need} {unit} each; "
                f"the cluster has {_count(len(fitting), 'node')} with >= {need} {unit}{left} "
                f"(nodes: {listing}{cpu_note})"
            )
        chosen[i] = fitting[: layout.num_nodes]
        for node_id in chosen[i]:
            free[node_id] -= need
        placed.append("+".join(roles))
    return [chosen[i] for i in range(len(groups))]


def check_resources(layouts: dict[str, RoleLayout], colocate: str, use_gpu: bool, nodes: list[dict]) -> None:
    """Raise PlacementError if the device groups cannot all fit on `nodes` (`ray.nodes()` dicts); see assign_nodes."""
    assign_nodes(plan_device_groups(layouts, colocate), use_gpu, nodes)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# ---------------------------------------------------------------------------------------------------------------
# Reserving (Ray)


@dataclass
class RolePlacement:
    """One role's share of a reserved device group; bundle r of `placement_group` is rank r's device.

    With k roles on a device group, each of their actors asks for 1/k of its bundle: num_gpus = 1/k and
    num_cpus = 1/k with GPUs, num_cpus = 1/k without. The fractions only divide Ray's accounting; sharing the
    device's memory is up to the roles (e.g. offloading the frozen ones).
    """

    role: str
    placement_group: PlacementGroup
    num_nodes: int
    devices_per_node: int
    share: float  # fraction of each bundle one actor asks for, 1/k rounded down to Ray's 1e-4 granularity
    use_gpu: bool

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices_per_node

    def actor_options(self, rank: int) -> dict:
        """Keyword arguments for `ActorClass.options(**...)` placing rank `rank` on its device."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"{self.role}: rank {rank} outside 0..{self.world_size - 1}")
        return {
            "num_cpus": self.share,
            "num_gpus": self.share if self.use_gpu else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=rank
            ),
        }


def create_placements(
    layouts: dict[str, RoleLayout], colocate: str, use_gpu: bool, timeout_s: float = 60
) -> dict[str, RolePlacement]:
    """Reserve one placement group per device group and wait until all are placed; returns role -> placement.

    Raises PlacementError before creating anything if the cluster is too small (`check_resources`), and after
    removing what it created if the groups are not placed within `timeout_s` seconds.
    """
    groups = plan_device_groups(layouts, colocate)
    if not groups:
        return {}
    node_slots = assign_nodes(groups, use_gpu, ray.nodes())
    bundle = _device_bundle(use_gpu)
    created: list[tuple[PlacementGroup, list[str]]] = []
    try:
        for (layout, roles), node_ids in zip(groups, node_slots):
            selectors = [{_NODE_ID_LABEL: node_id} for node_id in node_ids for _ in range(layout.devices_per_node)]
            pg = placement_group([dict(bundle) for _ in selectors], strategy="PACK", bundle_label_selector=selectors)
            created.append((pg, roles))
        refs = [pg.ready() for pg, _ in created]
        _, not_ready = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if not_ready:
            pending = [roles for ref, (_, roles) in zip(refs, created) if ref in not_ready]
            raise PlacementError(
                f"{', '.join('+'.join(roles) for roles in pending)}: placement group not ready after {timeout_s:g} s; "
                f"are other jobs holding the {'GPU' if use_gpu else 'CPU'}s? (ray status shows what is in use)"
            )
    except BaseException:
        for pg, _ in created:
            remove_placement_group(pg)
        raise

    placements = {}
    for (layout, roles), (pg, _) in zip(groups, created):
        share = math.floor(1e4 / len(roles)) / 1e4
        for role in roles:
            placements[role] = RolePlacement(role, pg, layout.num_nodes, layout.devices_per_node, share, use_gpu)
    return placements


def remove_placements(placements: dict[str, RolePlacement]) -> None:
    """Remove each distinct placement group once; removing an already removed group is a no-op in Ray.

    Removal is asynchronous: Ray kills the actors in the group and frees its resources shortly after.
    """
    seen = set()
    for placement in placements.values():
        pg = placement.placement_group
        if pg.id not in seen:
            seen.add(pg.id)
            remove_placement_group(pg)


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def describe_actor() -> dict:
    """Where the calling actor runs: node_ip, node_id, and devices (GPU ids as "0,1", or "cpu" without GPUs)."""
    gpu_ids = ray.get_gpu_ids()
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "devices": ",".join(str(i) for i in gpu_ids) if gpu_ids else "cpu",
    }


def placement_table(rows: list[dict]) -> str:
    """Fixed-width table of rows {"role", "rank", "node_ip", "node_id", "devices", "zero_stage"} ("-" where a
    row lacks a column), by role (actor, critic, reference, reward, then others by name) and rank."""
    columns = ("role", "rank", "node_ip", "node_id", "devices", "zero_stage")
    def order(row: dict) -> tuple:
        role = row["role"]
        return (ROLES.index(role) if role in ROLES else len(ROLES), role, row["rank"])

    ordered = sorted(rows, key=order)
    cells = [list(columns)] + [[str(row.get(c, "-")) for c in columns] for row in ordered]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)
