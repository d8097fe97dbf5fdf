"""DeepSpeed setup: process group, precision, the generated DeepSpeed JSON, the engine.

The Hydra config is the one source of truth: `build_deepspeed_config` turns it
into DeepSpeed's JSON with no `auto` values left, and the run directory keeps a
copy. The same code runs NCCL + bf16 on GPUs and gloo + fp32 on a CPU.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from trainer.config import (DeepSpeedConfig, ModelConfig, OptimConfig, resolve_zero_stage, training_state_bytes,
                            zero_stage_note)
from trainer.contracts import scrub_secrets
from trainer.loopback import gloo_on_loopback, is_loopback, listening_socket
from trainer.shared_rows import SHM_DIR, SharedRows, shared_rows


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def has_gpu() -> bool:
    return torch.cuda.is_available()


def dist_backend() -> str:
    return "nccl" if has_gpu() else "gloo"


# How long a rank waits in a collective for its peers before it gives up with an error (train.collective_timeout_s
# sets it; this is its default). torch's own is 30 minutes for gloo and 10 for NCCL, DeepSpeed's 10.
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0

# What the last init_distributed set, re-applied by build_engine to the groups DeepSpeed makes.
_collective_timeout = timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S)


def init_distributed(collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> DistInfo:
    """Join the process group set up by the launcher (deepspeed/torchrun env vars);
    a plain `python -m` run becomes a world of one with an in-memory store (no listening socket).
    Every collective of this process gives up after `collective_timeout_s` (`set_collective_timeout`),
    also in a group formed earlier (trainer.cli forms it before the config is read)."""
    import deepspeed

    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = timedelta(seconds=collective_timeout_s)
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    if has_gpu():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # torch's TCPStore listens on every interface whatever MASTER_ADDR says. A world of one needs no
        # rendezvous, so its store lives in memory and nothing listens; a world on one node (a loopback
        # MASTER_ADDR) gets a store that listens on that address alone. DeepSpeed joins the initialised group.
        store = dist.HashStore() if world_size == 1 else loopback_store(rank, world_size, timeout)
        if store is not None:
            dist.init_process_group(dist_backend(), store=store, rank=rank, world_size=world_size, timeout=timeout)
    if not dist.is_initialized() or not deepspeed.comm.is_initialized():
        _leave_the_inference_all_reduce_unbuilt()
        deepspeed.init_distributed(dist_backend=dist_backend(), verbose=False, timeout=timeout)
    set_collective_timeout(collective_timeout_s)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def _destroy_process_group_at_exit() -> None:
    """A rank that had finished and printed `done` aborted at exit once in the test suite ("terminate called without
    an active exception", -6), and torchrun reported the run failed. Left to interpreter shutdown, gloo's threads can
    still hold finished work whose tensors are freed after Python is gone (pytorch/pytorch#179291 describes it and
    proposes this same atexit call); destroyed here, they go first."""
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


atexit.register(_destroy_process_group_at_exit)  # a no-op in a process that never joins a group


def _leave_the_inference_all_reduce_unbuilt() -> None:
    """On the CPU accelerator, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op as it
    starts: minutes of compiling on a small machine the first time in an environment, and a ninja up-to-date check
    in every process after. Only `deepspeed.comm.inference_all_reduce` (tensor-parallel inference) calls the op; it
    falls back to torch's all_reduce without it, and training's collectives never use it. So it is not built."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # By its module path: `deepspeed.comm.torch` as an attribute is the torch package, which
        # deepspeed.comm's star import puts there.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def set_collective_timeout(seconds: float) -> None:
    """Every process group this process is in gives up on a collective after `seconds` (an error on the
    rank waiting, instead of a hang): the default group, and the copies of it DeepSpeed makes with
    `dist.new_group`, which would otherwise get torch's default rather than the default group's. Groups
    made later get it from `build_engine`. torchtitan sets its groups' timeouts the same way
    (`_set_pg_timeout`, after its first step)."""
    global _collective_timeout
    _collective_timeout = timedelta(seconds=seconds)
    if not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        c10d._set_pg_timeout(_collective_timeout, group)


def loopback_store(rank: int, world_size: int, timeout: timedelta) -> Optional[dist.TCPStore]:
    """The rendezvous store of a world whose MASTER_ADDR is a loopback address (its ranks share one node: a PPO
    role on Ray's local cluster, ranks started by hand), rank 0's listening on that address alone; the world's
    gloo pairs bind the loopback interface too (GLOO_SOCKET_IFNAME, unless set). None where torchrun's agent
    holds the store (its ranks only connect to it) or the address is another (other nodes must reach it, and
    torch's store then listens on every interface)."""
    host = os.environ.get("MASTER_ADDR", "")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or not is_loopback(host):
        return None
    port = int(os.environ["MASTER_PORT"])
    gloo_on_loopback()
    listen_fd = listening_socket(host, port)[0] if rank == 0 else None  # the store owns it from here
    return dist.TCPStore(host, port, world_size, rank == 0, timeout, master_listen_fd=listen_fd)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if has_gpu() else torch.device("cpu")


def peak_memory_gb() -> float:
    """This process's peak memory: allocated GPU memory, or resident memory on the CPU."""
    if has_gpu():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few scalars over all ranks in one collective (a no-op in a world of one)."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def resolve_precision(requested: str) -> str:
    """`auto` is bf16 on GPUs that support it and fp32 elsewhere (CPU bf16 is slow and
    makes the small-model equivalence checks meaningless)."""
    if requested != "auto":
        return requested
    return "bf16" if has_gpu() and torch.cuda.is_bf16_supported() else "fp32"


def resolve_stage_for_model(ds: DeepSpeedConfig, world_size: int, model: ModelConfig, tokenizer, scalar_head: bool,
                            trained: bool, key: str = "deepspeed") -> tuple[DeepSpeedConfig, Optional[str]]:
    """`ds` with `stage: auto` made a number for this world and model (`resolve_zero_stage`), and the line that says
    what it became and why (None for an explicit stage). The model is counted, on the meta device, only where the
    stage depends on it: several ranks. `trained`: trained in full (not frozen, not adapters)."""
    from trainer.model import count_parameters

    state_bytes = None
    if ds.stage == "auto" and world_size > 1:
        state_bytes = training_state_bytes(count_parameters(model, tokenizer, scalar_head), trained,
                                           resolve_precision(ds.precision))
    resolved = resolve_zero_stage(ds, world_size, state_bytes)
    return resolved, zero_stage_note(ds, resolved, world_size, state_bytes, key)


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def build_deepspeed_config(ds: DeepSpeedConfig, micro_batch_size: int, grad_accum: int, world_size: int,
                           max_grad_norm: float) -> dict:
    """DeepSpeed's JSON for one engine: a supervised stage's, or a PPO role's (frozen roles
    pass grad_accum=1; their optimizer keys are unused)."""
    ds = resolve_zero_stage(ds, world_size)
    precision = resolve_precision(ds.precision)
    zero: dict = {"stage": ds.stage}
    if ds.stage >= 1:
        zero.update(
            overlap_comm=ds.overlap_comm,
            contiguous_gradients=ds.contiguous_gradients,
            reduce_bucket_size=ds.reduce_bucket_size,
        )
    if ds.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            memory_efficient_linear=ds.memory_efficient_linear,
            # Needed to gather a full state dict for the Hugging Face export.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": has_gpu()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": has_gpu()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # progress is ours (tqdm + metrics.jsonl)
        "wall_clock_breakdown": False,
        # Torch's AdamW on CPU; DeepSpeed only insists on its CPU Adam for offload.
        "zero_force_ds_cpu_optimizer": False,
    }
    for key, value in ds.extra.items():
        config[key] = value
    return config


def optimizer_step(engine) -> Optional[float]:
    """`engine.step()`, returning the global gradient norm of the update at an accumulation boundary
    (before clipping; None between boundaries).

    DeepSpeed keeps that norm for its ZeRO and bf16/fp16 optimizers, but with a plain fp32 optimizer
    at stage 0 (what `deepspeed.stage=auto` runs on one rank) it clips without keeping it. There the
    clipping `build_engine` installs keeps it (`clipping_that_keeps_its_norm`); without clipping it is
    computed here, from the gradients the step is about to apply, which backward has already
    averaged over the ranks."""
    boundary = engine.is_gradient_accumulation_boundary()
    own_norm = boundary and not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())
    norm = None
    clipped = getattr(engine, "clipped_grad_norm", None)  # kept by `clipping_that_keeps_its_norm`
    if own_norm and clipped is None:
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None]))
    engine.step()
    if not boundary:
        return None
    if own_norm:
        return norm if clipped is None else clipped.norm
    norm = engine.get_global_grad_norm()  # a tensor under ZeRO-3
    return None if norm is None else float(norm)


def lr_multiplier(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `total_steps`.

    `step` counts optimizer steps already taken (0 for the first update)."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    decay = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, offload: bool):
    # Biases and norm weights take no weight decay, as in every modern LM recipe.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    # The fused kernel (CPU and CUDA) replaces a Python loop over tensors; on small
    # models that loop was up to a fifth of a step.
    return torch.optim.AdamW(groups, fused=True, **kwargs)


@contextlib.contextmanager
def zero3_init_context(ds_config: dict):
    """While active, `from_pretrained`/`from_config` build ZeRO-3 partitioned weights
    directly (transformers reads this global), so no rank holds the whole model."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (kept alive while the model is built)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


@contextlib.contextmanager
def torch_linear():
    """torch's own `F.linear` inside, whatever ZeRO-3 installed. With `memory_efficient_linear`, building a
    ZeRO-3 model swaps `F.linear` for a Python autograd Function in the whole process; it only saves memory
    where backward runs. Without gradients (evaluation, PPO's generation and scoring) it is pure overhead
    (docs/benchmarks.md has what it cost the generation replica)."""
    import torch.nn.functional as F

    swapped = F.linear
    F.linear = torch._C._nn.linear  # what F.linear is before anyone replaces it
    try:
        yield
    finally:
        F.linear = swapped


def gather_per_block(model: torch.nn.Module) -> None:
    """Mark the model's transformer blocks (its `_no_split_modules`) as ZeRO-3 leaf modules:
    one parameter fetch per block. A model that declares no blocks keeps per-module hooks."""
    from deepspeed.utils import set_z3_leaf_modules

    blocks = list(getattr(model, "_no_split_modules", None) or [])
    if blocks:
        set_z3_leaf_modules(model, blocks, raise_if_not_found=False)


def build_engine(model: torch.nn.Module, ds: DeepSpeedConfig, optim: Optional[OptimConfig], ds_config: dict,
                 total_steps: int = 0):
    """A training engine, or with `optim=None` an inference-only one (a frozen PPO role under ZeRO-3)."""
    import deepspeed

    if ds.stage == 3 and ds.stage3_gather_per_block:
        gather_per_block(model)  # before initialize, which installs the hooks
    if optim is None:
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        set_collective_timeout(_collective_timeout.total_seconds())  # the groups DeepSpeed has just made
        return _redacted(engine)
    optimizer = build_optimizer(model, optim, offload=ds.offload_optimizer)

    # A callable, so the schedule wraps the optimizer DeepSpeed actually steps.
    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(step, optim, total_steps))

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    set_collective_timeout(_collective_timeout.total_seconds())  # the groups DeepSpeed has just made
    fp32_stage0 = (engine.zero_optimization_stage() == 0 and engine.sequence_parallel_size == 1
                   and not (engine.has_moe_layers or engine.fp16_enabled() or engine.bfloat16_enabled()))
    if fp32_stage0:
        gradients_in_one_buffer(engine)
    if fp32_stage0 and engine.gradient_clipping() > 0 and engine.mpu is None:
        clipping_that_keeps_its_norm(engine)
    return _redacted(engine)


@dataclass
class ClippedNorm:
    norm: Optional[float] = None  # the global norm of the last clipped step's gradients, before clipping


def clipping_that_keeps_its_norm(engine) -> None:
    """An fp32 stage-0 engine's gradient clipping with DeepSpeed's arithmetic (`deepspeed.runtime.utils.
    clip_grad_norm_`: the per-gradient norms' root sum of squares, averaged over the data-parallel ranks, a factor
    min(1, max / (norm + 1e-6))), which keeps the norm it computes (`engine.clipped_grad_norm`) for `optimizer_step`
    to report instead of computing it a second time, and leaves the gradients alone where the factor is 1, where
    DeepSpeed multiplies every gradient by it anyway. Each is a pass over every gradient; the weights come out bit
    for bit the same (tested against DeepSpeed's own engine)."""
    from deepspeed.utils import groups

    kept = ClippedNorm()

    def clip_fp32_gradients() -> None:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if not grads:
            kept.norm = 0.0
            return
        total = torch.stack([g.detach().float().norm(2.0) for g in grads]).pow(2.0).sum().float().pow(1.0 / 2.0)
        group = groups._get_data_parallel_group()
        total = total * 1.0 / float(dist.get_world_size(group=group))
        dist.all_reduce(total, group=group)
        max_norm = torch.tensor([float(engine.gradient_clipping())], device=total.device)
        coef = torch.min(torch.tensor([1.0], device=total.device), max_norm / (total + 1e-6))
        if float(coef) < 1.0:
            for g in grads:
                g.data.mul_(coef)
        kept.norm = float(total)

    engine.clip_fp32_gradients = clip_fp32_gradients
    engine.clipped_grad_norm = kept


def gradients_in_one_buffer(engine) -> None:
    """An unpartitioned fp32 engine with its gradients kept in one flat buffer, averaged over the ranks in place.

    DeepSpeed's stage-0 average copies every gradient into a new flat tensor, all-reduces it and copies the
    result back, at each step, on one rank too; and zeroing the gradients frees them. On a CPU a new tensor of the
    model's size is fresh memory, which the kernel hands out page by page. Here each trained parameter's `.grad`
    is a view into one buffer made once: backward accumulates into it, one all-reduce averages it (nothing to
    average on one rank), and zeroing the gradients zeroes it (they stay bound). The arithmetic is DeepSpeed's: a
    parameter that got no gradient takes part as zeros, as DeepSpeed fills it, and the sum is divided by the
    world size. (Its cost at the compute-bound bench size: docs/benchmarks.md.)

    On the CPU with several ranks on one host the buffer is this rank's row of memory the ranks share
    (`trainer.shared_rows`), averaged there instead of by an all-reduce over loopback; which one a run uses is
    printed."""
    params = [p for p in engine.module.parameters() if p.requires_grad and p.numel() > 0]
    group = engine.seq_data_parallel_group
    ranks = dist.get_world_size(group)
    numel, dtype, dev = sum(p.numel() for p in params), params[0].dtype, params[0].device
    shared = shared_rows(numel, dtype, group) if dev.type == "cpu" and ranks > 1 else None
    flat = shared.mine if isinstance(shared, SharedRows) else torch.zeros(numel, dtype=dtype, device=dev)
    if dist.get_rank() == 0 and ranks > 1:
        how = (f"in memory the {ranks} ranks share ({SHM_DIR})" if isinstance(shared, SharedRows)
               else f"by {dist.get_backend(group)} all-reduce" + (f": {shared}" if shared else ""))
        print(f"gradients averaged {how}", flush=True)
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()

    def bind() -> None:
        """Each parameter's gradient is its view (a gradient made elsewhere is copied in first)."""
        for p, view in zip(params, views):
            if p.grad is not view:
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view

    def zero_grad(*_args, **_kwargs) -> None:
        flat.zero_()
        bind()

    def allreduce_gradients(*_args, **_kwargs) -> None:
        if not engine.is_gradient_accumulation_boundary():
            return  # as DeepSpeed's: the ranks communicate at the window's end only
        bind()
        if ranks == 1:
            return
        if isinstance(shared, SharedRows):
            shared.average()
            return
        dist.all_reduce(flat, group=group)
        flat.div_(ranks)

    engine.zero_grad = zero_grad
    engine.allreduce_gradients = allreduce_gradients
    engine.gradient_buffer = flat
    zero_grad()


def _redacted(engine):
    """DeepSpeed pickles `engine.config`, the dict it was given, into every checkpoint's states (`ds_config`): a secret
    in it (a monitor's API key in `deepspeed.extra`, say) would be written there. Its parsed copy, which the engine
    and its monitors run on, keeps the values; the dict checkpoints record is redacted."""
    engine.config = scrub_secrets(engine.config)
    return engine
