"""The training config: one dataclass per YAML section, with the defaults and the checks that
need no model. ``load_config(path, overrides)`` is the single entry; the resolved config is
saved to ``<trainer.output_dir>/config.yaml``.

Critic tokenizer: a critic built from a different HF checkpoint than the policy reads the
prompt text re-tokenized with its own tokenizer (its own chat template applied to the same
messages); special tokens the two tokenizers do not share are reported at start-up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from megatron_sppo.errors import UserError
from megatron_sppo.quant.fp8_train import FP8Settings
from megatron_sppo.rollout import ENGINES

DTYPES = ("float32", "bfloat16", "float16")
CRITIC_ESTIMATORS = ("sppo", "gae")
DYNAMIC_SAMPLING_ESTIMATORS = ("grpo", "rloo")


def _choice(key: str, value, options) -> None:
    if value not in options:
        raise UserError(f"config key {key}={value!r}: choose one of {', '.join(map(str, options))}")


def _positive(**values) -> None:
    for key, value in values.items():
        if value is None or value <= 0:
            raise UserError(f"config key {key}={value!r} must be > 0")


@dataclass
class ModelConfig:
    """A Megatron model (policy or critic): where it starts (an HF directory or a Megatron
    checkpoint written by megatron-sppo, Megatron-LM or Megatron-Bridge), its layout (uneven
    pipeline stages as Megatron-LM's --decoder-first/last-pipeline-num-layers), its optimizer, the
    memory settings a large model needs (recompute, sequence parallelism, distributed
    optimizer, optimizer CPU offload) and FP8 training (``fp8.format`` e4m3|hybrid,
    ``fp8.recipe`` delayed|tensorwise|blockwise|mxfp8; Transformer Engine on a GPU)."""

    checkpoint: str | None = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # uneven pipeline stages, Megatron-LM's --decoder-first/last-pipeline-num-layers: the
    # stages not given share the rest evenly; neither given and pp not dividing the layers:
    # every stage L // pp layers, the first the remainder too (models/stages.py)
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    params_dtype: str = "float32"
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    optimizer_cpu_offload: bool = False
    sequence_packing: bool = True  # THD packs on the Transformer Engine path (GPU)
    fp8: FP8Settings = field(default_factory=FP8Settings)

    def check(self, prefix: str) -> None:
        _positive(**{f"{prefix}.tensor_model_parallel_size": self.tensor_model_parallel_size,
                     f"{prefix}.pipeline_model_parallel_size": self.pipeline_model_parallel_size,
                     f"{prefix}.lr": self.lr})
        _choice(f"{prefix}.params_dtype", self.params_dtype, DTYPES)
        _choice(f"{prefix}.lr_decay_style", self.lr_decay_style,
                ("constant", "linear", "cosine", "inverse-square-root", "WSD"))
        _choice(f"{prefix}.recompute_granularity", self.recompute_granularity,
                (None, "full", "selective"))
        if self.recompute_granularity == "full" and self.recompute_method not in ("uniform",
                                                                                   "block"):
            raise UserError(f"config key {prefix}.recompute_method must be uniform or block when "
                            f"{prefix}.recompute_granularity=full")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise UserError(f"config key {prefix}.sequence_parallel=true needs "
                            f"{prefix}.tensor_model_parallel_size > 1")
        if self.optimizer_cpu_offload and not self.use_distributed_optimizer:
            raise UserError(f"config key {prefix}.optimizer_cpu_offload=true needs "
                            f"{prefix}.use_distributed_optimizer=true (megatron-core offloads "
                            "the distributed optimizer's states)")
        if self.lr_warmup_steps < 0:
            raise UserError(f"config key {prefix}.lr_warmup_steps must be >= 0")
        # choices now; the layer counts once the checkpoint's architecture is read
        self.fp8.check(prefix=f"{prefix}.fp8")


@dataclass
class CriticConfig(ModelConfig):
    """The SPPO prompt-only critic (or the token-level critic of ``gae``). ``checkpoint`` None
    means: start from the policy's checkpoint. It runs on the policy's ranks with a layout of
    its own: its tensor/pipeline sizes may differ from the policy's (a 1.5B critic at TP=1
    beside a 7B policy at TP=2), and its data-parallel size is the launched ranks / (tp*pp). head_bias_init: ``zero`` (the paper: V = 0.5 at
    the start) or ``first_batch`` (bias = logit of the first batch's success rate).
    warmup_steps: critic-only steps before the policy starts learning (the paper uses 50 for
    token-level PPO, 0 for SPPO). mini_batch_size: prompts per critic mini-batch (None:
    ``trainer.mini_batch_size``), as verl's critic.ppo_mini_batch_size: the policy may take
    several mini-batch steps while the critic takes one on the whole batch."""

    lr: float = 5e-6
    head_bias_init: str = "zero"
    warmup_steps: int = 0
    mini_batch_size: int | None = None

    def check(self, prefix: str) -> None:
        super().check(prefix)
        _choice(f"{prefix}.head_bias_init", self.head_bias_init, ("zero", "first_batch"))
        if self.warmup_steps < 0:
            raise UserError(f"config key {prefix}.warmup_steps must be >= 0")


@dataclass
class SGLangConfig:
    """SGLang servers for rollouts: launched by the trainer or given by address.
    ``model_path``: the checkpoint the servers load (default: the policy's HF files); a
    block-FP8 copy (``megatron-sppo convert hf-to-block-fp8``) makes rollouts FP8, and the
    weight sync then quantises the trainer's weights into the same form. ``colocated``: the
    servers share the trainer's GPUs, so Megatron's gradients and optimizer states leave the
    GPU while they generate and (with ``enable_memory_saver``) the servers release their
    memory while Megatron trains; false for servers on their own GPUs.
    Colocated servers get their weights over CUDA IPC (``/update_weights_from_tensor``, each
    trainer rank on a server GPU supplying that TP rank's entry); servers on their own GPUs
    over an NCCL broadcast from rank 0 (``/update_weights_from_distributed``).
    ``sync_master_address``/``sync_master_port``: where the servers reach this trainer's rank
    0 for the NCCL weight broadcast (default: this host's name when the servers are given by
    address, 127.0.0.1 for servers the trainer launches itself).
    ``enable_deterministic_inference``: launch the servers with SGLang's flag of that name, the
    only way SGLang 0.5.23 uses the per-sample seeds the trainer sends, so rollouts repeat
    run to run; it costs decoding speed (batch-invariant kernels, the pytorch sampler, a
    restricted choice of attention backends) and refuses min_p. Without it seeds are
    best-effort: SGLang ignores them and rollouts differ between runs.
    ``n_mode``: ``duplicate`` sends the n samples of a prompt as n requests with seeds of
    their own; ``parallel`` uses SGLang's n (one prefill per prompt), which shares one seed
    among the n samples and is therefore refused with ``enable_deterministic_inference``."""

    addresses: list[str] = field(default_factory=list)
    model_path: str | None = None
    colocated: bool = True
    python: str = "/opt/sglang-venv/bin/python"
    replicas: int = 1
    tp_size: int = 1
    mem_fraction_static: float = 0.7
    enable_memory_saver: bool = True
    base_gpu_id: int = 0
    port: int = 30000
    dtype: str = "bfloat16"
    quantization: str | None = None
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 3600.0
    bucket_mb: int = 512
    sync_master_address: str | None = None
    sync_master_port: int = 29700
    enable_deterministic_inference: bool = False
    n_mode: str = "duplicate"

    def check(self) -> None:
        _choice("rollout.sglang.n_mode", self.n_mode, ("duplicate", "parallel"))
        if self.n_mode == "parallel" and self.enable_deterministic_inference:
            raise UserError("config key rollout.sglang.n_mode=parallel with "
                            "rollout.sglang.enable_deterministic_inference=true: SGLang draws "
                            "the n samples of a prompt with one seed, so they come out "
                            "identical; use n_mode=duplicate")


@dataclass
class RolloutConfig:
    engine: str = "local"
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_prompt_length: int = 1024
    max_response_length: int = 8192
    stop: list[str] = field(default_factory=list)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)

    def check(self) -> None:
        _choice("rollout.engine", self.engine, ENGINES)
        _positive(**{"rollout.n": self.n, "rollout.temperature": self.temperature,
                     "rollout.max_prompt_length": self.max_prompt_length,
                     "rollout.max_response_length": self.max_response_length})
        if not 0 < self.top_p <= 1:
            raise UserError(f"config key rollout.top_p={self.top_p} must be in (0, 1]")
        self.sglang.check()


@dataclass
class SelectionConfig:
    """Critic-guided prompt selection (``algorithm.prompt_selection``, SPPO with its critic):
    each step draws ``pool_factor`` x ``trainer.prompts_per_step`` candidate prompts, scores
    them with the critic in one prompt-only forward pass and keeps ``prompts_per_step`` by
    ``rule`` (algorithms/selection.py): ``weighted`` draws proportional to V(1 - V) among
    prompts with ``floor <= V <= ceiling``, ``filter`` uniformly inside that band, ``sample``
    proportional to V(1 - V) without a band, ``topk`` the largest V(1 - V); first, a share
    ``exploration`` of the chosen prompts is drawn uniformly from the whole pool. Skipped
    prompts go back to the data stream (drawn again after the epoch's own order)."""

    pool_factor: int = 4
    rule: str = "weighted"
    floor: float = 0.05
    ceiling: float = 0.95
    exploration: float = 0.1

    def check(self) -> None:
        from megatron_sppo.algorithms.selection import check_selection

        _positive(**{"algorithm.selection.pool_factor": self.pool_factor})
        try:
            check_selection(self.rule, self.floor, self.ceiling, self.exploration)
        except ValueError as e:
            raise UserError(f"config section algorithm.selection: {e}") from None


@dataclass
class AlgorithmConfig:
    """The advantage estimator and losses. truncated_reward: the reward of a response cut at
    the length limit (None keeps the verifier's score, as the SPPO authors' runs do); a
    response it applies to also counts as incorrect for the critic's target and the
    accuracy metric, so that V keeps estimating the chance of the reward it is subtracted
    from. truncated_in_loss: false drops such responses from the policy loss (DAPO's
    overlong filtering). loss_agg_mode: ``token-mean`` (every token of the mini-batch
    weighs the same), ``seq-mean-token-mean`` (every sequence weighs the same: what verl
    computes with one sequence per micro-batch, as the authors' 7B run) or
    ``seq-mean-token-sum``; each exact across micro-batches and data-parallel ranks.
    value_clip: the token-level critic's value clip (gae). old_logprobs: ``policy`` (a
    forward pass of the pre-update policy) or ``engine`` (the rollout engine's).
    sppo_baseline: ``critic`` (the paper) or ``running_mean`` (the ablation: V is a running
    mean of past batches' success rate, the same for every prompt; no critic is built).
    prompt_selection: choose each step's prompts with the critic (``selection.*``).
    dynamic_sampling (grpo, rloo; DAPO): drop groups whose rewards are all equal and generate
    for more prompts until the batch is full, at most ``dynamic_sampling_max_rounds``
    generation rounds a step (a batch still short then is filled with dropped groups);
    every generated token counts in ``generated_tokens``."""

    estimator: str = "sppo"
    sppo_baseline: str = "critic"
    baseline_momentum: float = 0.9
    normalize_advantages: bool = False
    gamma: float = 1.0
    lam: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = 3.0
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: float = 0.0
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    value_clip: float = 0.2
    truncated_reward: float | None = 0.0
    truncated_in_loss: bool = True
    old_logprobs: str = "policy"
    prompt_selection: bool = False
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 8

    def check(self) -> None:
        _choice("algorithm.old_logprobs", self.old_logprobs, ("policy", "engine"))
        _choice("algorithm.sppo_baseline", self.sppo_baseline, ("critic", "running_mean"))
        if not 0 <= self.baseline_momentum < 1:
            raise UserError("config key algorithm.baseline_momentum must be in [0, 1)")
        self.selection.check()
        if self.prompt_selection and not (self.estimator == "sppo" and self.needs_critic):
            raise UserError("config key algorithm.prompt_selection=true needs the SPPO critic: "
                            "set algorithm.estimator=sppo and algorithm.sppo_baseline=critic")
        if self.dynamic_sampling and self.estimator not in DYNAMIC_SAMPLING_ESTIMATORS:
            raise UserError("config key algorithm.dynamic_sampling=true is for the group "
                            f"estimators ({', '.join(DYNAMIC_SAMPLING_ESTIMATORS)}); "
                            f"algorithm.estimator is {self.estimator}")
        _positive(**{"algorithm.dynamic_sampling_max_rounds": self.dynamic_sampling_max_rounds})

    def estimator_options(self) -> dict:
        """The options ``compute_advantages`` takes for this estimator."""
        return {"sppo": {"normalize": self.normalize_advantages},
                "gae": {"gamma": self.gamma, "lam": self.lam},
                "grpo": {}, "rloo": {"kl_coef": self.kl_in_reward},
                "remax": {"kl_coef": self.kl_in_reward},
                "reinforce_pp": {"gamma": self.gamma, "kl_coef": self.kl_in_reward},
                }.get(self.estimator, {})

    @property
    def needs_critic(self) -> bool:
        return self.estimator in CRITIC_ESTIMATORS and not self.running_mean_baseline

    @property
    def running_mean_baseline(self) -> bool:
        return self.estimator == "sppo" and self.sppo_baseline == "running_mean"

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0 or self.kl_in_reward > 0


@dataclass
class DataConfig:
    """Prompt data: files (JSONL, Parquet, HF datasets on disk) or ``builtin:arithmetic``.
    ``instruction`` is appended to text prompts (chat-message prompts are used as given).
    ``overlong_prompts``: a training prompt longer than ``rollout.max_prompt_length`` tokens
    is left out (``drop``, verl's filter_overlong_prompts) or keeps its last tokens
    (``truncate_left``, verl's ``data.truncation=left`` as in the SPPO authors' 7B run)."""

    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    format: str = "auto"
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    overlong_prompts: str = "drop"
    shuffle: bool = True
    eval_size: int = 400
    arithmetic_task: str = "demo"

    def check(self) -> None:
        from megatron_sppo.data.arithmetic import TASKS
        from megatron_sppo.data.prompts import FORMATS, OVERLONG

        _choice("data.format", self.format, FORMATS)
        _choice("data.arithmetic_task", self.arithmetic_task, tuple(TASKS))
        _choice("data.overlong_prompts", self.overlong_prompts, OVERLONG)
        _positive(**{"data.eval_size": self.eval_size})


@dataclass
class RewardConfig:
    """``function``: the default reward function (``math``, ``math_answer``, ``math_auto``,
    ``arithmetic`` or ``package.module:function``); ``routes``: data_source -> function
    (``math_dapo`` -> ``math_auto`` is built in: the check the prompt asks for).
    ``correct``/``incorrect``/``no_answer`` pay verdicts; ``format_penalty`` is subtracted
    when a response's format is off (for ``math``: not exactly one boxed answer after the
    think block). ``require_think_close``: think-mode models, where a response that never
    writes ``</think>`` has no answer. ``shuffle`` permutes outcomes within each batch: the
    control run showing that learning comes from the reward."""

    function: str = "math"
    routes: dict = field(default_factory=dict)
    correct: float = 1.0
    incorrect: float = 0.0
    no_answer: float = 0.0
    format_penalty: float = 0.0
    require_think_close: bool = False
    timeout_s: float = 5.0
    workers: int = 2
    shuffle: bool = False


@dataclass
class TrainerConfig:
    output_dir: str = "outputs/run"
    total_steps: int = 100
    prompts_per_step: int = 64
    mini_batch_size: int | None = None
    ppo_epochs: int = 1
    max_tokens_per_microbatch: int = 4096
    save_interval: int = 0
    keep_last: int = 2
    eval_interval: int = 0
    eval_samples: int = 8
    eval_before: bool = False
    seed: int = 1234
    max_bad_steps: int = 3
    max_train_seconds: float = 0.0
    tensorboard: bool = True
    progress: bool = True

    def check(self) -> None:
        _positive(**{"trainer.total_steps": self.total_steps,
                     "trainer.prompts_per_step": self.prompts_per_step,
                     "trainer.ppo_epochs": self.ppo_epochs,
                     "trainer.max_tokens_per_microbatch": self.max_tokens_per_microbatch,
                     "trainer.keep_last": self.keep_last})
        if self.mini_batch_size is not None:
            _positive(**{"trainer.mini_batch_size": self.mini_batch_size})
        if self.max_train_seconds < 0:
            raise UserError("config key trainer.max_train_seconds must be >= 0 (0: no limit)")


@dataclass
class Config:
    policy: ModelConfig = field(default_factory=ModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def check(self, world_size: int | None = None) -> None:
        """Every check that needs no model: choices, ranges, the estimator with n, layouts."""
        from megatron_sppo.algorithms import check_estimator

        self.policy.check("policy")
        self.critic.check("critic")
        self.rollout.check()
        self.data.check()
        self.trainer.check()
        self.algorithm.check()
        if self.policy.checkpoint is None:
            raise UserError("config key policy.checkpoint is not set: give an HF or Megatron "
                            "checkpoint directory (or builtin:tiny-arithmetic)")
        layouts = [(m.tensor_model_parallel_size, m.pipeline_model_parallel_size)
                   for m in (self.policy, self.critic)]
        if self.algorithm.needs_critic and self.critic.fp8.format and layouts[0] != layouts[1]:
            # megatron-core reduces FP8 amax histories over its global (the policy's) groups
            raise UserError("config key critic.fp8.format needs the critic at the policy's "
                            "tensor/pipeline sizes: megatron-core's FP8 amax reduction uses the "
                            "global groups; set critic.tensor_model_parallel_size/"
                            "pipeline_model_parallel_size to the policy's or turn critic FP8 off")
        try:
            self.loss_config()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                check_estimator(self.algorithm.estimator, self.rollout.n,
                                **self.algorithm.estimator_options())
        except UserError as e:
            raise UserError(f"config section algorithm: {e}") from None
        for w in caught:
            warnings.warn(f"algorithm.estimator={self.algorithm.estimator}: {w.message}",
                          stacklevel=2)
        if self.algorithm.estimator == "gae" and self.rollout.n != 1:
            warnings.warn("algorithm.estimator=gae with rollout.n > 1: token-level PPO is "
                          "usually run with one response per prompt", stacklevel=2)
        batch = self.trainer.prompts_per_step * self.rollout.n
        minis = {"policy": ("trainer.mini_batch_size", self.trainer.mini_batch_size),
                 "critic": ("critic.mini_batch_size", self.critic_mini_batch_size)}
        for name, (key, size) in minis.items():
            if name == "critic" and not self.algorithm.needs_critic:
                continue
            if size is not None and (size < 1 or self.trainer.prompts_per_step % size):
                raise UserError(f"config key {key}={size} must divide "
                                f"trainer.prompts_per_step={self.trainer.prompts_per_step}")
        if world_size is not None:
            for name, model in (("policy", self.policy), ("critic", self.critic)):
                if name == "critic" and not self.algorithm.needs_critic:
                    continue
                mini = minis[name][1] or self.trainer.prompts_per_step
                mp = model.tensor_model_parallel_size * model.pipeline_model_parallel_size
                if world_size % mp:
                    raise UserError(
                        f"config keys {name}.tensor_model_parallel_size x "
                        f"{name}.pipeline_model_parallel_size = {mp} does not divide the "
                        f"{world_size} launched ranks: launch a multiple of {mp} ranks")
                dp = world_size // mp
                if (mini * self.rollout.n) % dp or batch % dp:
                    raise UserError(
                        f"{name} data-parallel size {dp} does not divide the mini-batch of "
                        f"{mini * self.rollout.n} sequences: change trainer.mini_batch_size "
                        "or the number of ranks")

    @property
    def critic_mini_batch_size(self) -> int | None:
        """Prompts per critic mini-batch (None: the whole batch)."""
        return self.critic.mini_batch_size or self.trainer.mini_batch_size

    def loss_config(self):
        from megatron_sppo.algorithms import PolicyLossConfig

        a = self.algorithm
        return PolicyLossConfig(eps_low=a.eps_low, eps_high=a.eps_high, dual_clip=a.dual_clip,
                                agg=a.loss_agg_mode, tis_cap=a.tis_cap, kl_coef=a.kl_coef,
                                kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef)


def load_config(path=None, overrides: list[str] = (), world_size: int | None = None) -> Config:
    """Config from a YAML file (or the defaults) with ``key=value`` overrides, fully checked."""
    from megatron_sppo.config.loader import apply_overrides, build_section, read_yaml

    tree = read_yaml(path) if path is not None else {}
    config = build_section(Config, apply_overrides(tree, list(overrides)))
    config.check(world_size)
    return config
