"""Typed configuration of `python -m rlhf.ppo` (primary config `conf/ppo.yaml`).

Each role (actor, critic, reference, reward) reuses the supervised stages' model,
DeepSpeed and optimizer schemas, plus where its ranks go. `validate()` checks
everything that can be checked without Ray or a model, and names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from trainer.config import (
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    PeftConfig,
    _require,
    resolve_zero_stage,
    validate_data_source,
    validate_deepspeed,
    validate_model,
    validate_optim,
    validate_peft,
)
from trainer.contracts import COLOCATE_MODES, NONFINITE_MODES, ROLES, TRAINED_ROLES

GENERATION_MODES = ("replica", "zero3")
REFERENCE_FROM_POLICY = ("auto", "false")
OLD_LOGPROBS = ("auto", "generation", "recompute")
KL_PLACES = ("reward", "loss")


@dataclass
class RoleConfig:
    """One role's model, engine and devices: `num_nodes` x `devices_per_node` ranks (a GPU each,
    or a CPU slot each where there is no GPU)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)  # used by the trained roles (actor, critic)
    # Trained roles (actor, critic): LoRA adapters on a frozen model (`actor.peft=lora`, conf/peft/, docs/lora.md),
    # or the whole model (none). A critic's score head trains in full.
    peft: PeftConfig = field(default_factory=PeftConfig)
    num_nodes: int = 1
    devices_per_node: int = 1
    # Sequences per forward pass on one rank (and per micro-batch of an update, for trained roles).
    micro_batch_size: int = 16
    # reward only: score with Python functions instead of a model (rule-based, verifiable rewards), e.g.
    # [{_target_: rlhf.reward_functions.exact_match, weight: 1.0}]: each is called as fn(prompts, responses, rows)
    # -> one float per response (rows: each prompt's dataset row, with its reference `answer`), the score is the
    # weighted sum, and each function's mean is logged (reward/fn/<name>). `weight` (default 1) and `name`
    # (default: the function's) are read here; every other key is the function's keyword argument.
    functions: list[dict[str, Any]] = field(default_factory=list)
    # reward only: the reward model's tokenizer differs from the policy's, so decode the policy's
    # tokens and re-encode them with the reward model's tokenizer.
    retokenize: bool = False
    # reference only: auto: with a KL term and a policy with adapters (actor.peft=lora), the reference is the policy
    # with its adapters off, computed by the policy's ranks, and no reference group starts. false: a separate
    # reference group loads reference.model even then.
    from_policy: str = "auto"

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices_per_node

    @property
    def frozen_source(self) -> str:
        """With adapters: where the frozen weights that a trained role's checkpoint leaves out come from (its
        FROZEN_FROM, trainer.checkpoint); "" for a role trained in full."""
        return (self.model.name_or_path or "random init") if self.peft.method != "none" else ""


@dataclass
class RolloutConfig:
    prompts_per_iteration: int = 64
    # G responses per prompt (a group: GRPO and RLOO compare them). Each sample is drawn with its own seed,
    # derived from (iteration, the prompt's position in the prompt stream, the sample's index), so what a
    # prompt gets depends on nothing else: not the batch, the ranks, or the other samples.
    samples_per_prompt: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    # replica: a plain copy of the policy generates (KV cache, no ZeRO hooks), refreshed after each
    # policy update. zero3: generate through the ZeRO-3 engine, which re-gathers every layer per token.
    generation: str = "replica"
    # Where PPO's "old" log-probs come from. generation: recorded while sampling (as TRL does), from
    # the temperature-scaled logits before top-p/top-k truncation (the distribution the policy loss
    # scores), which saves the policy a forward pass over every rollout. recompute: a forward pass
    # over the finished rollouts (as OpenRLHF and veRL do). auto: generation in fp32, where the two
    # agree to float rounding; recompute in bf16/fp16, where KV-cached logits can differ by more.
    old_logprobs: str = "auto"
    # Start sampling the next iteration's rollouts as soon as the policy has updated, while the critic's
    # update finishes: its new weights are first read when those rollouts are scored, so the computation is
    # the same and the devices idle less. Off: each iteration waits for both updates before sampling
    # (less peak memory where the policy and critic share a device).
    overlap_critic_update: bool = True
    # Compute a group's prompt (samples_per_prompt > 1) once, not G times: sampling prefills it once and copies
    # its KV cache to the group's rows, and every log-prob pass (the policy's update, the reference, recomputed
    # old log-probs) scores the group in one row `[prompt | response 1 | ... | response G]` under a mask that
    # hides the responses from each other; update mini-batches then take whole groups. The samples and log-probs
    # are those of each rollout alone (tested). Needs attention that takes a 4D mask (sdpa, eager), not
    # flash_attention_2.
    share_prompt: bool = True


def old_logprobs_from_generation(r: RolloutConfig, precision: str) -> bool:
    """Whether the policy records the old log-probs while sampling (rollout.old_logprobs, with auto
    resolved for the policy's resolved precision)."""
    if r.old_logprobs == "auto":
        return precision == "fp32"
    return r.old_logprobs == "generation"


@dataclass
class AlgoConfig:
    """The RL algorithm as a choice of pure functions (rlhf/algorithms.py): the advantage estimator, the policy
    loss's ratio, clipping and aggregation, and where the KL goes. `algo=ppo|grpo|rloo|reinforce_pp` picks a
    preset (conf/algo/); what the driver starts follows from it (`uses_critic`, `uses_reference`)."""

    name: str = "ppo"  # what the preset is called (logs, the before/after table)
    # gae: PPO with a critic | grpo | rloo | reinforce_pp: critic-free, no value model is started.
    advantage: str = "gae"
    norm_by_std: bool = True  # grpo: divide by the group's reward std; false is Dr. GRPO
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    # DAPO's clip-higher: the ratio's upper clip is 1 + clip_eps_high (null: 1 + clip_eps).
    clip_eps_high: Optional[float] = None
    # token: PPO's per-token ratio | sequence: GSPO's sequence-level ratio (use a small clip_eps, ~4e-4).
    ratio: str = "token"
    # How a mini-batch's per-token losses combine: token_mean (every token weighs the same; DAPO) |
    # seq_mean_token_mean (each sequence's mean, averaged: GRPO's original; GSPO) | seq_mean_token_sum.
    loss_agg: str = "token_mean"
    # Truncated importance sampling: where the sampler's log-probs differ from the training pass's (bf16, another
    # kernel), each token's loss is weighted by min(pi_train / pi_sampler, tis_cap). null: off.
    tis_cap: Optional[float] = None
    value_clip_eps: Optional[float] = 0.2
    entropy_coef: float = 0.0
    kl_coef: float = 0.05  # 0: no KL term, and no reference model is started
    kl_estimator: str = "k1"  # k1 | k2 | k3
    kl_in: str = "reward"  # reward: -beta*KL per token in the reward; loss: beta*KL in the policy loss
    kl_controller: str = "fixed"  # fixed | adaptive
    kl_target: float = 0.1  # adaptive only: per-sequence KL the controller steers to
    kl_horizon: int = 10000
    # Normalise model scores with the reward stage's reward_stats.json (mean/std), then clip.
    normalize_reward: bool = True
    reward_clip: Optional[float] = 5.0
    whiten_advantages: bool = True
    # DAPO's overlong soft punishment: responses longer than rollout.max_new_tokens - overlong_buffer lose up to
    # overlong_penalty, linearly, reaching it at max_new_tokens. 0: off.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # DAPO's dynamic sampling: drop groups whose scores are all equal (no signal under a group baseline) and
    # sample more prompts until the batch is full, at most max_sampling_rounds rounds per iteration; a batch
    # still short after them is filled with dropped groups (they carry no advantage). Counts are logged.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    ppo_epochs: int = 1
    mini_batch_size: int = 32  # rollouts per optimizer step, over all ranks of a role
    critic_warmup_iterations: int = 0  # the critic trains alone for this many iterations

    @property
    def uses_critic(self) -> bool:
        from rlhf.algorithms import CRITIC_ESTIMATORS

        return self.advantage in CRITIC_ESTIMATORS

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0


def reference_from_policy(kl_coef: float, actor_peft: str, from_policy: str) -> bool:
    """Whether the KL term's reference is the policy with its adapters off (peft's `disable_adapter()`), so that no
    reference group starts: there is a KL term, the policy trains adapters, and reference.from_policy is auto."""
    return kl_coef > 0 and actor_peft != "none" and str(from_policy).lower() == "auto"


@dataclass
class ClusterConfig:
    # null: start a local Ray instance; "auto" or "<host>:<port>" joins a running cluster
    # (RAY_ADDRESS, when set, is used when this is null).
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # local instance only; null: enough CPU slots for every role
    colocate: str = "none"  # none | reference_with_actor | reward_with_critic | both | all
    placement_timeout_s: float = 120.0
    torch_threads: int = 1  # per actor on CPU: several actors share the cores
    # The longest the driver waits for a role's call from the moment it is made; a rank that has not answered
    # by then ends the run (exit 1) naming the role, rank, node and call. start: the calls that start the roles
    # (the actor processes, their process groups, every model loaded from storage: the slowest thing a run does,
    # once). call: every later one, a phase of an iteration or an evaluation (generate, scores, train, save...).
    # Generous, like torch's 30-minute collective timeout: a false alarm costs the work since the last checkpoint.
    start_timeout_s: float = 3600.0
    call_timeout_s: float = 1800.0
    # After a preemption signal the driver still finishes the iteration and saves it, but gives the calls in
    # flight at most this many seconds from the signal: a role that is hung (or too slow for the scheduler's
    # grace period) ends the run with exit 75 and the iteration unsaved, the last checkpoint intact. Keep it
    # below the time the scheduler leaves to save (launch.slurm sets half its --save-timeout; a pod's
    # terminationGracePeriodSeconds).
    preemption_wait_s: float = 240.0


@dataclass
class PPOTrainConfig:
    iterations: int = 40
    eval_every: int = 20  # also evaluated before the first iteration; 0: only at start and end
    eval_prompts: int = 200  # first N held-out prompts, greedy
    save_every: int = 20  # 0: only at the end; -1: never (benchmarks, sweeps that keep only metrics)
    keep_last: int = 2
    samples_every: int = 10  # a table of prompts/responses/scores in the log and W&B
    # A mini-batch update whose loss is non-finite: skip it (counted) or stop, as in the supervised stages.
    nonfinite: str = "skip"  # skip | stop
    max_nonfinite_skips: int = 10  # over the whole run, per trained role
    # Every role's process group gives up on a collective after this many seconds (an error naming the
    # role instead of a hang): the supervised stages' key of the same name (trainer.config.TrainConfig).
    collective_timeout_s: float = 1800.0

    def saves_at(self, step: int) -> bool:
        """Whether iteration `step` (counted from 1) ends with a checkpoint. save_every=-1 writes none
        (a preemption still saves, so that the run can resume)."""
        if self.save_every < 0:
            return False
        return step == self.iterations or (self.save_every > 0 and step % self.save_every == 0)


@dataclass
class PPOConfig:
    stage: str = "ppo"
    seed: int = 1234
    resume: Optional[str] = None
    output_dir: str = "."
    # Prompts (and reference answers for exact match) in any supervised format; eval_path held out.
    data: DataConfig = field(default_factory=DataConfig)
    actor: RoleConfig = field(default_factory=RoleConfig)
    critic: RoleConfig = field(default_factory=RoleConfig)
    reference: RoleConfig = field(default_factory=RoleConfig)
    reward: RoleConfig = field(default_factory=RoleConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # The final metric the entry function returns: what a sweeper (hydra/sweeper=optuna) optimises.
    objective: str = "eval/reward_score"

    def role(self, name: str) -> RoleConfig:
        return getattr(self, name)

    @property
    def reference_from_policy(self) -> bool:
        """The reference's log-probs come from the policy's ranks with its adapters off (no reference group)."""
        return reference_from_policy(self.algo.kl_coef, self.actor.peft.method, self.reference.from_policy)

    @property
    def active_roles(self) -> tuple[str, ...]:
        """The roles this algorithm runs, in ROLES order: the critic only for an estimator that needs one, the
        reference only when there is a KL term and the policy cannot be its own reference (adapters off)."""
        skip = {"critic"} if not self.algo.uses_critic else set()
        if not self.algo.uses_reference or self.reference_from_policy:
            skip.add("reference")
        return tuple(r for r in ROLES if r not in skip)

    @property
    def trained_roles(self) -> tuple[str, ...]:
        return tuple(r for r in TRAINED_ROLES if r in self.active_roles)

    @property
    def rollout_batch(self) -> int:
        return self.rollout.prompts_per_iteration * self.rollout.samples_per_prompt

    @property
    def optimizer_steps(self) -> int:
        """A trained role's optimizer steps over the whole run: its learning-rate schedule's length."""
        return self.train.iterations * self.algo.ppo_epochs * (self.rollout_batch // self.algo.mini_batch_size)

    def zero_stage(self, role: str) -> tuple[DeepSpeedConfig, Optional[str]]:
        """The role's deepspeed config with `stage: auto` made a number for its world size and model, and the line
        that says what it became and why (None for an explicit stage): `trainer.engine.resolve_stage_for_model`,
        called by each role's actors, by the driver before a resume and by the benches to record the layout."""
        from trainer.engine import resolve_stage_for_model
        from trainer.model import load_tokenizer

        rc, key = self.role(role), f"{role}.deepspeed"
        zero3_generation = role == "actor" and self.rollout.generation == "zero3"
        if zero3_generation and rc.deepspeed.stage == "auto" and rc.world_size > 1:
            # Generating through its ZeRO-3 engine asks for ZeRO-3 whatever the policy's size (checked in validate).
            return (resolve_zero_stage(rc.deepspeed, rc.world_size),
                    f"{key}.stage: auto -> 3 (rollout.generation=zero3 generates through the ZeRO-3 engine)")
        return resolve_stage_for_model(rc.deepspeed, rc.world_size, rc.model, load_tokenizer(rc.model),
                                       scalar_head=role in ("critic", "reward"),
                                       trained=role in TRAINED_ROLES and rc.peft.method == "none", key=key)


def leave_out_unused_roles(dcfg) -> None:
    """In the composed (unresolved) config: the model paths of the roles this run does not start become null
    when they only point at an export (`${tf_require_export:...}`), so a critic-free run needs no reward
    export for a critic it never starts, nor reward functions a reward model. A path the user wrote stays."""
    from omegaconf import OmegaConf, open_dict

    from rlhf.algorithms import CRITIC_ESTIMATORS

    a = dcfg.algo
    separate_reference = a.kl_coef > 0 and not reference_from_policy(
        a.kl_coef, OmegaConf.select(dcfg, "actor.peft.method", default="none"),
        OmegaConf.select(dcfg, "reference.from_policy", default="auto"))
    unused = ([] if a.advantage in CRITIC_ESTIMATORS else ["critic"]) + ([] if separate_reference else ["reference"])
    if dcfg.reward.get("functions"):
        unused.append("reward")
    with open_dict(dcfg):
        for role in unused:
            for key in ("name_or_path", "tokenizer"):
                if OmegaConf.is_interpolation(dcfg[role].model, key):
                    dcfg[role].model[key] = None


def register_ppo_config() -> None:
    ConfigStore.instance().store(name="ppo_schema", node=PPOConfig)


def validate(cfg: PPOConfig) -> None:
    """Everything checkable before Ray starts; raises ConfigError naming the key."""
    # The math (torch) loads only where a run validates.
    from rlhf.algorithms import ADVANTAGE_ESTIMATORS, KL_CONTROLLERS, KL_ESTIMATORS, LOSS_AGGREGATIONS, RATIO_LEVELS

    r, a, t = cfg.rollout, cfg.algo, cfg.train
    validate_data_source(cfg.data)
    batch = cfg.rollout_batch
    for key, value in (("rollout.prompts_per_iteration", r.prompts_per_iteration),
                       ("rollout.samples_per_prompt", r.samples_per_prompt), ("rollout.max_new_tokens", r.max_new_tokens),
                       ("algo.ppo_epochs", a.ppo_epochs), ("algo.mini_batch_size", a.mini_batch_size),
                       ("train.iterations", t.iterations), ("train.keep_last", t.keep_last)):
        _require(value > 0, key, f"must be > 0, got {value}")
    _require(t.nonfinite in NONFINITE_MODES, "train.nonfinite", f"must be skip|stop, got {t.nonfinite!r}")
    _require(t.max_nonfinite_skips >= 0, "train.max_nonfinite_skips", f"must be >= 0, got {t.max_nonfinite_skips}")
    _require(t.save_every >= -1, "train.save_every", f"must be >= 0, or -1 for no checkpoints, got {t.save_every}")
    _require(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _require(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _require(r.generation in GENERATION_MODES, "rollout.generation", f"must be one of {GENERATION_MODES}, got {r.generation!r}")
    _require(r.old_logprobs in OLD_LOGPROBS, "rollout.old_logprobs", f"must be one of {OLD_LOGPROBS}, got {r.old_logprobs!r}")
    _require(a.kl_estimator in KL_ESTIMATORS, "algo.kl_estimator", f"must be one of {KL_ESTIMATORS}, got {a.kl_estimator!r}")
    _require(a.kl_in in KL_PLACES, "algo.kl_in", f"must be one of {KL_PLACES}, got {a.kl_in!r}")
    _require(a.kl_controller in KL_CONTROLLERS, "algo.kl_controller",
             f"must be one of {KL_CONTROLLERS}, got {a.kl_controller!r}")
    _require(a.kl_coef >= 0, "algo.kl_coef", f"must be >= 0, got {a.kl_coef}")
    _require(0 <= a.gamma <= 1 and 0 <= a.lam <= 1, "algo.gamma/algo.lam", "must be in [0, 1]")
    _require(a.clip_eps > 0, "algo.clip_eps", f"must be > 0, got {a.clip_eps}")
    _require(a.clip_eps_high is None or a.clip_eps_high > 0, "algo.clip_eps_high",
             f"must be > 0 or null, got {a.clip_eps_high}")
    _require(a.advantage in ADVANTAGE_ESTIMATORS, "algo.advantage",
             f"must be one of {tuple(ADVANTAGE_ESTIMATORS)}, got {a.advantage!r}")
    _require(a.ratio in RATIO_LEVELS, "algo.ratio", f"must be one of {RATIO_LEVELS}, got {a.ratio!r}")
    _require(a.loss_agg in LOSS_AGGREGATIONS, "algo.loss_agg", f"must be one of {LOSS_AGGREGATIONS}, got {a.loss_agg!r}")
    _require(a.tis_cap is None or a.tis_cap >= 1, "algo.tis_cap", f"must be >= 1 or null, got {a.tis_cap}")
    _require(a.tis_cap is None or r.old_logprobs != "generation", "algo.tis_cap",
             "weighs the sampler's log-probs against the training pass's, so the old log-probs must be recomputed: "
             "set rollout.old_logprobs=recompute (or auto)")
    _require(0 <= a.overlong_buffer < r.max_new_tokens, "algo.overlong_buffer",
             f"must be in [0, rollout.max_new_tokens={r.max_new_tokens}), got {a.overlong_buffer}")
    _require(a.max_sampling_rounds >= 1, "algo.max_sampling_rounds", f"must be >= 1, got {a.max_sampling_rounds}")
    if a.advantage in ("grpo", "rloo") or a.dynamic_sampling:
        _require(r.samples_per_prompt >= 2, "rollout.samples_per_prompt",
                 f"algo.advantage={a.advantage}{' with algo.dynamic_sampling' if a.dynamic_sampling else ''} compares "
                 f"the samples of a prompt: needs >= 2, got {r.samples_per_prompt}")
    for key, value in (("train.collective_timeout_s", t.collective_timeout_s),
                       ("cluster.start_timeout_s", cfg.cluster.start_timeout_s),
                       ("cluster.call_timeout_s", cfg.cluster.call_timeout_s),
                       ("cluster.preemption_wait_s", cfg.cluster.preemption_wait_s)):
        _require(value > 0, key, f"must be > 0 seconds, got {value}")
    _require(cfg.cluster.colocate in COLOCATE_MODES, "cluster.colocate",
             f"must be one of {COLOCATE_MODES}, got {cfg.cluster.colocate!r}")
    for name in cfg.active_roles:
        role = cfg.role(name)
        _require(role.num_nodes > 0 and role.devices_per_node > 0, f"{name}.num_nodes/devices_per_node", "must be > 0")
        _require(role.micro_batch_size > 0, f"{name}.micro_batch_size", f"must be > 0, got {role.micro_batch_size}")
        if name == "reward" and role.functions:
            for i, fn in enumerate(role.functions):
                _require(isinstance(fn, dict) and "_target_" in fn, f"reward.functions[{i}]",
                         "needs a _target_ naming a Python function")
                _require(isinstance(fn.get("weight", 1.0), (int, float)), f"reward.functions[{i}].weight",
                         f"must be a number, got {fn.get('weight')!r}")
            continue
        validate_model(role.model, f"{name}.model")
        validate_deepspeed(role.deepspeed, f"{name}.deepspeed")
        _require(not (r.share_prompt and r.samples_per_prompt > 1 and name in ("actor", "reference")
                      and role.model.attn_implementation not in ("sdpa", "eager")), "rollout.share_prompt",
                 f"needs {name}.model.attn_implementation=sdpa|eager (a 4D attention mask), got "
                 f"{role.model.attn_implementation!r}; set rollout.share_prompt=false")
        # Every rank of a ZeRO-3 group must run the same number of forward passes.
        _require(batch % role.world_size == 0, f"{name}.num_nodes/devices_per_node",
                 f"the rollout batch ({batch} = rollout.prompts_per_iteration x samples_per_prompt) must split "
                 f"evenly over the role's {role.world_size} ranks")
    ref = cfg.reference
    _require(str(ref.from_policy).lower() in REFERENCE_FROM_POLICY, "reference.from_policy",
             f"must be one of {'|'.join(REFERENCE_FROM_POLICY)}, got {ref.from_policy!r}")
    for name in ("reference", "reward"):
        _require(cfg.role(name).peft.method == "none", f"{name}.peft",
                 f"only the trained roles (actor.peft, critic.peft) take adapters; {name} is frozen, got "
                 f"{cfg.role(name).peft.method!r}")
    if cfg.reference_from_policy:
        for key in ("name_or_path", "tokenizer", "revision"):
            mine, policy = getattr(ref.model, key), getattr(cfg.actor.model, key)
            # null: derived from the policy's and left out as unused (leave_out_unused_roles)
            _require(mine is None or mine == policy, f"reference.model.{key}",
                     f"is {mine!r}, the policy's {policy!r}: with actor.peft={cfg.actor.peft.method} the reference is "
                     f"the policy with its adapters off; set reference.from_policy=false for another reference model")
    for name in cfg.trained_roles:
        role = cfg.role(name)
        validate_optim(role.optim, f"{name}.optim")
        validate_peft(role.peft, f"{name}.peft")
        # The generation replica follows the adapters (trainer.adapters.copy_merged), not trained token rows; and an
        # RL role's prompts come in the format its SFT model was trained on.
        _require(not role.peft.trainable_tokens, f"{name}.peft.trainable_tokens",
                 f"RL roles train no token embeddings; leave it null (none is chosen here), got "
                 f"{role.peft.trainable_tokens}")
        _require(a.mini_batch_size % role.world_size == 0 and batch % a.mini_batch_size == 0, "algo.mini_batch_size",
                 f"{a.mini_batch_size} must divide the rollout batch ({batch}) and split over {name}'s "
                 f"{role.world_size} ranks")
        per_rank = a.mini_batch_size // role.world_size
        _require(per_rank % role.micro_batch_size == 0 or per_rank < role.micro_batch_size,
                 f"{name}.micro_batch_size", f"{role.micro_batch_size} must divide the {per_rank} rollouts "
                 f"of a mini-batch per rank (algo.mini_batch_size / ranks)")
    if r.generation == "zero3" and resolve_zero_stage(cfg.actor.deepspeed, cfg.actor.world_size).stage != 3:
        raise ConfigError(f"rollout.generation=zero3 needs the policy under ZeRO-3 (actor.deepspeed.stage=3, or auto "
                          f"with more than one rank; it is {cfg.actor.deepspeed.stage} with "
                          f"{cfg.actor.world_size}); use rollout.generation=replica otherwise")
