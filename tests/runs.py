"""Running the real entry points as subprocesses, shared by the training tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

# A tiny model and a small slice of the synthetic suite keep each run to seconds.
TINY = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.num_attention_heads=4",
    "model.tiny.num_key_value_heads=4",
    "model.tiny.intermediate_size=128",
    "data.max_length=64",
    "train.eval_every=0",
    "train.export=false",
    "logger.log_every=1",
    "logger.report=false",  # a few seconds of plotting per run; the tests of reports turn it on
    "optim.warmup_steps=2",
]


PPO_ROLES = ("actor", "critic", "reference", "reward")
# A PPO run of seconds: few prompts, short answers, small batches.
PPO_SMALL = [
    # 64 rows of the synthetic suite: the default's 20,000 take seconds to build and tokenize, per run.
    f"data.path={Path(__file__).parent / 'data' / 'prompts.jsonl'}",
    "data.max_length=64",
    "rollout.prompts_per_iteration=8",
    "rollout.max_new_tokens=6",
    "algo.mini_batch_size=4",
    "actor.micro_batch_size=2",
    "critic.micro_batch_size=4",
    "train.eval_prompts=8",
    "train.eval_every=0",
    "train.samples_every=1",
    "logger.report=false",
]


def tiny_ppo_model(out: Path) -> list[str]:
    """A tiny random-init Llama saved as a Hugging Face directory in `out`, which every PPO role
    loads (policy and reference start equal, as from an SFT export; critic and reward get a fresh
    head); the overrides that point the roles at it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.config import ModelConfig
    from trainer.model import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                 tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return [f"{role}.model.name_or_path={out}" for role in PPO_ROLES]


def write_sft_jsonl(path: Path, rows: int) -> Path:
    """The first `rows` train rows of the synthetic suite as prompt/completion JSONL."""
    from trainer.synthetic import make_rows

    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n"
                            for r in make_rows("sft", "train", seed=0)[:rows]))
    return path


def write_pairs_jsonl(root: Path, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    """The first rows of the synthetic suite's preference train and eval splits as JSONL (prompt, chosen,
    rejected, kind) in `root`: (train path, eval path)."""
    from trainer.synthetic import make_rows

    paths = []
    for split, n in (("train", train_rows), ("eval", eval_rows)):
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected", "kind")}) + "\n"
                                for row in make_rows("preference", split, seed=0)[:n]))
        paths.append(path)
    return paths[0], paths[1]


def tiny_sft(data: Path) -> list[str]:
    """Overrides of a seconds-long SFT run on `data`: the tiny model, no evaluation, a fixed lr schedule
    (so runs of different lengths, and a resumed one, train alike)."""
    return [*TINY, f"data.path={data}", "data.eval_path=null", "optim.decay_steps=100"]


def run_env() -> dict:
    env = dict(os.environ)
    env.pop("TUNEFORGE_RUN_ID", None)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def marked() -> dict:
    """An environment variable marking one run: every process it starts (torchrun's ranks, Ray's servers and
    workers) inherits it, so `processes_of` finds them whoever else runs on this machine."""
    return {"TUNEFORGE_TEST_RUN": uuid.uuid4().hex}


def processes_of(env: dict) -> dict[int, str]:
    """{pid: command line} of the live processes started with `env`'s TUNEFORGE_TEST_RUN mark (`marked`)."""
    from bench.harness import marked_pids

    found = {}
    for pid in marked_pids(f"TUNEFORGE_TEST_RUN={env['TUNEFORGE_TEST_RUN']}"):
        with contextlib.suppress(OSError):  # gone since
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


# Loopback as /proc/net/tcp{,6} write it: 127.0.0.1, ::1, and ::ffff:127.0.0.1 (gRPC's IPv4 on a v6 socket).
LOOPBACK = ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")


def listening_addresses(pid: int) -> list[str]:
    """The addresses process `pid` listens on (TCP), as /proc/net/tcp{,6} write them; [] once it is gone."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed since the listing
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return [f[1].split(":")[0] for table in ("/proc/net/tcp", "/proc/net/tcp6")
            for f in (line.split() for line in Path(table).read_text().splitlines()[1:])
            if f[3] == "0A" and f[9] in inodes]  # LISTEN, and one of the process's sockets


def left_behind(env: dict, within_s: float = 10) -> list[str]:
    """The command lines of the marked run's processes still alive `within_s` after it ended."""
    deadline = time.time() + within_s  # killed processes may take a moment to go
    while (found := processes_of(env)) and time.time() < deadline:
        time.sleep(0.5)
    return list(found.values())


def committed(run_dir: Path) -> int:
    """The last iteration an RL run's driver committed (0 before the first)."""
    try:
        return int((run_dir / "checkpoints" / "driver" / "latest").read_text().split("_")[1])
    except (FileNotFoundError, IndexError, ValueError):  # not yet, or caught mid-write
        return 0


def run_stage(run_dir: Path, *overrides: str, nproc: int = 1, stage: str = "sft", check: bool = True, timeout: int = 600):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "launch.torchrun", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", f"trainer.{stage}", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def metric(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric in a run's metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return metric(run_dir, "train/loss")


def assert_same_losses(straight: Path, resumed: Path, steps: int) -> None:
    """`resumed` logged every step 1..`steps` once, each loss equal to the straight run's (exact resume)."""
    import pytest

    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, b[step], a[step])


def signal_when(cmd: list[str], ready: Callable[[], bool], sig: int, *, env: dict | None = None,
                timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Start `cmd`, send it `sig` once `ready()` holds (as a scheduler preempting it would), and wait
    for it to exit; fails if it ended before it could be signalled."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be signalled:\n{proc.stderr.read()[-3000:]}"
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
