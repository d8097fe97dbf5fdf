"""The import graph: launchers (and the report) load no training stack, role workers load no supervised data pipeline,
the shared contracts and the config composer stay light, and no module of trainer/, rlhf/ or launch/
reaches itself through imports (module-level or inside functions)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "rlhf", "launch")
TRAINING_STACK = ("torch", "deepspeed", "ray", "transformers")
DATA_PIPELINE = ("trainer.data", "trainer.preference", "datasets")


def modules(package: str) -> list[str]:
    return sorted(f"{package}.{p.stem}" for p in (REPO / package).glob("*.py") if p.stem != "__init__")


def loaded_after(code: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` (packages, or modules) a fresh interpreter has loaded after running `code`."""
    report = "import sys; print('LOADED', sorted(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = eval(proc.stdout.split("LOADED ", 1)[1])
    return sorted({w for w in watched for m in loaded if m == w or m.startswith(w + ".")})


def loaded_after_import(module: str, watched: tuple[str, ...]) -> list[str]:
    return loaded_after(f"import {module}", watched)


@pytest.mark.parametrize("module", [*modules("launch"), "trainer.contracts", "trainer.compose", "rlhf.config",
                                    "trainer.report"])
def test_launchers_contracts_the_composer_and_the_report_load_no_training_stack(module):
    assert loaded_after_import(module, TRAINING_STACK) == []


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_rendering_and_checking_a_cluster_job_loads_no_training_stack(stage):
    # The launchers' whole path short of submitting: compose the stage's config, render the script or spec.
    code = (f"from launch import slurm, ray_job\n"
            f"assert slurm.main([{stage!r}, '--dry-run', 'seed=7']) == 0\n"
            f"assert ray_job.main([{stage!r}, '--dry-run', 'seed=7']) == 0")
    assert loaded_after(code, TRAINING_STACK) == []


@pytest.mark.parametrize("module", ["rlhf.worker", "rlhf.actor", "rlhf.critic", "rlhf.reference", "rlhf.reward",
                                    "trainer.reward_stats"])
def test_role_workers_load_no_supervised_data_pipeline(module):
    assert loaded_after_import(module, DATA_PIPELINE) == []


def project_imports(path: Path) -> set[str]:
    """The trainer/rlhf/launch modules `path` imports anywhere (functions included), except in its
    `if __name__ == "__main__":` block (an entry point re-importing itself by name)."""
    tree = ast.parse(path.read_text())
    main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    skip = {id(x) for block in main_blocks for x in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in PACKAGES and len(parts) >= 2 and (REPO / parts[0] / f"{parts[1]}.py").exists():
                found.add(f"{parts[0]}.{parts[1]}")
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"a"}}) == [["a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_trainer_rlhf_or_launch():
    graph = {m: project_imports(REPO / f"{m.replace('.', '/')}.py") for p in PACKAGES for m in modules(p)}
    assert import_cycles(graph) == []
