"""Secrets given as overrides stay out of every file a run writes (trainer/contracts.py holds the patterns and
the one redaction, trainer/hydra_secrets.py applies it to Hydra's own files); ordinary keys are not secrets."""

import json
import subprocess
import sys

import pytest
import yaml

from runs import LOOPBACK, REPO, TINY, run_env, write_sft_jsonl
from trainer.contracts import REDACTED, SECRET_KEY, redact_text, scrub_secrets
from trainer.engine import free_port
from wandb_records import read_offline_run

HF_SECRET = "hf_" + "Q" * 34
SK_SECRET = "sk-proj-" + "z9" * 12


@pytest.mark.parametrize("key", ["WANDB_API_KEY", "HF_TOKEN", "hf_token", "token", "logger.api_key", "apikey",
                                 "RAY_AUTH_TOKEN", "HUGGING_FACE_HUB_TOKEN", "client_secret", "aws_secret_access_key",
                                 "db.password", "GOOGLE_APPLICATION_CREDENTIALS", "judge-access-key"])
def test_secret_keys(key):
    assert SECRET_KEY.search(key)


@pytest.mark.parametrize("key", ["model.tokenizer", "rollout.max_new_tokens", "data.max_tokens", "pad_token",
                                 "eos_token_id", "TOKENIZERS_PARALLELISM", "train.num_tokens", "keyword",
                                 "algo.loss_agg", "secretary"])
def test_ordinary_keys_are_not_secrets(key):
    assert not SECRET_KEY.search(key)


def test_redaction_by_key_and_by_value():
    assert redact_text(f"logger.api_key={SK_SECRET}") == f"logger.api_key={REDACTED}"
    assert redact_text(f"--export=ALL,HF_TOKEN=abc,X=1") == f"--export=ALL,HF_TOKEN={REDACTED},X=1"
    assert redact_text(f"reward.functions.0.judge={HF_SECRET}") == f"reward.functions.0.judge={REDACTED}"
    assert redact_text("rollout.max_new_tokens=32 model.tokenizer=outputs/sft/hf_model") == \
        "rollout.max_new_tokens=32 model.tokenizer=outputs/sft/hf_model"
    config = {"logger": {"api_key": "k", "entity": None}, "extra": [{"hf_token": "t"}, SK_SECRET],
              "rollout": {"max_new_tokens": 32}, "model": {"tokenizer": "tok", "api_key": None}}
    assert scrub_secrets(config) == {"logger": {"api_key": REDACTED, "entity": None},
                                     "extra": [{"hf_token": REDACTED}, REDACTED],
                                     "rollout": {"max_new_tokens": 32}, "model": {"tokenizer": "tok", "api_key": None}}


def test_a_run_writes_no_secret_given_as_an_override(tmp_path):
    """config.yaml, deepspeed_config.json, Hydra's .hydra/*.yaml, the W&B run (config, command line, run name,
    group and tags) and the checkpoint, whose states DeepSpeed pickles its config into. `deepspeed.extra` is the
    carrier because it is a free-form dict the schema accepts."""
    data = write_sft_jsonl(tmp_path / "sft.jsonl", 16)
    run = tmp_path / "run"
    env = run_env()
    env.pop("WANDB_MODE", None)
    cmd = [sys.executable, "-m", "trainer.sft", *TINY, f"data.path={data}", "data.eval_path=null",
           "train.max_steps=1", "train.micro_batch_size=2", "logger=wandb", "logger.mode=offline",
           f"+deepspeed.extra.hf_token={SK_SECRET}", f"+deepspeed.extra.note={HF_SECRET}",
           f"logger.run_name=try-{HF_SECRET}", f"logger.group={SK_SECRET}", f"logger.tags=[a,{HF_SECRET}]",
           f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != data]
    assert any(p.name.endswith("model_states.pt") for p in written)  # a checkpoint, with DeepSpeed's config in it
    for path in written:
        for secret in (SK_SECRET, HF_SECRET):
            assert secret.encode() not in path.read_bytes(), f"secret leaked into {path}"
    assert {"config.yaml", "overrides.yaml", "hydra.yaml"} <= {p.name for p in written}
    assert f"+deepspeed.extra.hf_token={REDACTED}" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert yaml.safe_load((run / "config.yaml").read_text())["deepspeed"]["extra"] == {"hf_token": REDACTED,
                                                                                      "note": REDACTED}
    assert json.loads((run / "deepspeed_config.json").read_text())["hf_token"] == REDACTED
    run_file, = run.glob("wandb/offline-run-*/run-*.wandb")
    record = read_offline_run(run_file)
    assert record.config["deepspeed"]["extra"]["hf_token"] == REDACTED
    assert (record.name, record.group, record.tags) == (f"try-{REDACTED}", REDACTED, ["a", REDACTED])
    assert "train.max_steps=1" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())  # the rest kept


# Run by `python -c` and as a file torchrun starts, so it finds tests/runs.py by its absolute path.
LISTEN_PROBE = f"""
import os
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {str(REPO / "tests")!r})
from runs import listening_addresses as listening
from trainer.engine import init_distributed

init_distributed()
total = torch.ones(1)
dist.all_reduce(total)  # every rank's pairs are up
print("WORLD", int(total))
for address in listening(os.getpid()):
    print("LISTEN", address)
"""


AGENT_PROBE = r"""
print("GLOO", os.environ.get("GLOO_SOCKET_IFNAME"))
for address in listening(os.getppid()):  # torchrun's agent, which started this rank
    print("AGENT", address)
dist.barrier()  # neither rank leaves (and its agent with it) before both have looked
"""


def test_a_single_process_run_listens_on_no_interface_but_loopback():
    """torch's TCPStore binds every interface whatever MASTER_ADDR says; a world of one uses none."""
    proc = subprocess.run([sys.executable, "-c", LISTEN_PROBE], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    addresses = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("LISTEN")]
    assert all(a in LOOPBACK for a in addresses), addresses


def test_ranks_on_one_node_listen_on_no_interface_but_loopback():
    """Two ranks started without torchrun (as a PPO role's are on Ray's local cluster, MASTER_ADDR 127.0.0.1):
    rank 0's rendezvous store, which torch binds to every interface, and both ranks' gloo pairs listen on
    loopback alone."""
    env = {**run_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    procs = [subprocess.Popen([sys.executable, "-c", LISTEN_PROBE], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
        assert "WORLD 2" in out
    addresses = [line.split()[1] for out, _ in outputs for line in out.splitlines() if line.startswith("LISTEN")]
    assert addresses and all(a in LOOPBACK for a in addresses), addresses


@pytest.mark.distributed
def test_launch_torchrun_keeps_the_agents_stores_on_loopback_where_torchrun_listens_on_every_interface(tmp_path):
    """torchrun's agent holds the store its ranks meet at, which torch binds to every interface; `launch.torchrun`
    (torchrun's arguments and code) binds each of the agent's stores to the loopback address the ranks connect
    to, and sets GLOO_SOCKET_IFNAME=lo for them. Plain torchrun is run too: were its agent already on loopback,
    this test would say nothing (and the wrapper would be needless)."""
    def sockets(launcher: str) -> tuple[list[str], list[str]]:
        probe = tmp_path / "probe.py"
        probe.write_text(LISTEN_PROBE + AGENT_PROBE)
        logs = tmp_path / launcher  # one stdout file per rank: the two would interleave on one pipe
        proc = subprocess.run([sys.executable, "-m", launcher, "--standalone", "--nproc_per_node=2",
                               f"--log-dir={logs}", "--redirects=1", str(probe)],
                              cwd=REPO, env={k: v for k, v in run_env().items() if k != "GLOO_SOCKET_IFNAME"},
                              capture_output=True, text=True, timeout=300)
        out = "".join(f.read_text() for f in sorted(logs.rglob("stdout.log")))
        assert proc.returncode == 0 and out.count("WORLD 2") == 2, out + proc.stderr[-3000:]
        lines = out.splitlines()
        ranks = [x.split()[1] for x in lines if x.startswith("LISTEN")]
        agent = [x.split()[1] for x in lines if x.startswith("AGENT")]
        assert ranks and agent, out
        return ranks + agent, [x for x in lines if x.startswith("GLOO")]

    ours, gloo = sockets("launch.torchrun")
    assert all(a in LOOPBACK for a in ours), ours
    assert gloo == ["GLOO lo", "GLOO lo"]
    theirs, _ = sockets("torch.distributed.run")
    assert any(a not in LOOPBACK for a in theirs), theirs
