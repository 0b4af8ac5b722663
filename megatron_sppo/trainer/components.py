"""Everything a run holds, built once from the config: the Megatron policy (and critic,
reference), tokenizers, the prompt source, the reward scorer and the rollout engine.

Rollouts and rewards are produced on global rank 0 (the local engine runs in-process there;
the SGLang client talks to its servers from there) and broadcast, so every rank builds the
same step batch; the Megatron phases then split it by data-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_sppo.config import Config
from megatron_sppo.data.prompts import chat_prompt_ids, truncate_left
from megatron_sppo.errors import UserError
from megatron_sppo.rewards import Scored
from megatron_sppo.rollout.engine import Sample, SamplingParams
from megatron_sppo.trainer.collectives import broadcast_object
from megatron_sppo.trainer.colocation import CACHES, WEIGHTS, Colocation
from megatron_sppo.trainer.rl_step import StepBatch
from megatron_sppo.trainer.rollout_batch import pad_prompts, pad_rollouts
from megatron_sppo.trainer.weight_sync import WeightSync, build_weight_sync


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


def special_token_mismatch(policy_tok, critic_tok) -> list[str]:
    """Special tokens one tokenizer has and the other lacks (reported at start-up: the
    critic reads re-tokenized prompt text, and a template token it does not know becomes
    plain characters)."""
    a, b = set(policy_tok.all_special_tokens), set(critic_tok.all_special_tokens)
    return sorted(a ^ b)


@dataclass
class Components:
    cfg: Config
    policy: object
    critic: object | None
    reference: object | None
    tokenizer: object
    critic_tokenizer: object | None
    prompts: object
    engine: object | None = None
    scorer: object | None = None
    eval_records: list | None = None
    colocation: Colocation | None = None
    weight_sync: WeightSync | None = None
    state: dict = field(default_factory=dict)

    # ---- phases ------------------------------------------------------------------------

    def prompt_ids(self, records, tokenizer=None) -> list[list[int]]:
        """The prompts under the chat template of ``tokenizer`` (the policy's by default),
        cut to their last ``rollout.max_prompt_length`` tokens when
        ``data.overlong_prompts=truncate_left``."""
        ids = [chat_prompt_ids(tokenizer or self.tokenizer, r.prompt) for r in records]
        if self.cfg.data.overlong_prompts == "truncate_left":
            ids = [truncate_left(x, self.cfg.rollout.max_prompt_length) for x in ids]
        return ids

    def critic_inputs(self, records, policy_ids: list[list[int]] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompt ids and lengths in the critic's tokenization (SPPO);
        ``policy_ids``, the prompts already tokenized for the policy, serve when the two
        tokenizers are the same."""
        if policy_ids is None or self.critic_tokenizer is not None:
            policy_ids = self.prompt_ids(records, self.critic_tokenizer or self.tokenizer)
        return pad_prompts(policy_ids)

    def sampling(self, seed: int, greedy: bool = False) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=0.0 if greedy else r.temperature, top_p=r.top_p,
                              top_k=r.top_k, max_new_tokens=r.max_response_length,
                              stop=tuple(r.stop), n=1 if greedy else r.n, seed=seed)

    def generate(self, records, seed: int) -> dict:
        """Samples per prompt (and greedy ones for remax), broadcast from rank 0."""
        out = None
        if dist.get_rank() == 0:
            ids = self.prompt_ids(records)
            out = {"samples": self.engine.generate(ids, self.sampling(seed))}
            if self.cfg.algorithm.estimator == "remax":
                out["greedy"] = self.engine.generate(ids, self.sampling(seed, greedy=True))
        return broadcast_object(out)

    def score(self, records, rollouts: dict) -> Scored:
        out = None
        if dist.get_rank() == 0:
            out = self.scorer.score(records, rollouts["samples"])
            if "greedy" in rollouts:
                greedy = self.scorer.score(records, rollouts["greedy"])
                out.metrics["greedy_rewards"] = greedy.rewards
        return broadcast_object(out)

    def sync_weights(self, version: int) -> None:
        """Policy weights -> rollout engine (collective over the exporting ranks,
        :mod:`.weight_sync`); a colocated engine gets its weight memory back first."""
        self.colocation.before_sync()
        self.weight_sync.push(self.policy, version)

    def evaluate(self, step: int) -> dict:
        """Held-out metrics (collective; {} without eval data)."""
        from megatron_sppo.trainer.evaluation import eval_seed, evaluate_heldout

        if not self.eval_records:
            return {}
        return evaluate_heldout(self, self.eval_records, self.cfg.trainer.eval_samples,
                                seed=eval_seed(self.cfg, step))

    # ---- checkpoint state --------------------------------------------------------------

    def trainable(self) -> dict:
        return {"policy": self.policy, **({"critic": self.critic} if self.critic else {})}

    def state_dict(self) -> dict:
        return {"prompts": self.prompts.state_dict(), "state": dict(self.state)}

    def load_state(self, run: dict) -> None:
        self.prompts.load_state_dict(run["prompts"])
        self.state.update(run["state"])

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        if self.scorer is not None and hasattr(self.scorer, "close"):
            self.scorer.close()


def step_outcomes(cfg: Config, scored: Scored, truncated: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards and 0/1 correctness per sample after the truncation policy."""
    rewards = torch.tensor(scored.rewards, dtype=torch.float32)
    correctness = torch.tensor(scored.correctness, dtype=torch.float32)
    if cfg.algorithm.truncated_reward is not None:
        rewards = torch.where(truncated, cfg.algorithm.truncated_reward, rewards)
        correctness = torch.where(truncated, 0.0, correctness)
    return rewards, correctness


def make_step_batch(c: Components, cfg: Config, records, rollouts: dict,
                    scored: Scored) -> StepBatch:
    """Flatten n samples per prompt into one row each; apply the truncation policy: with
    ``algorithm.truncated_reward`` set, a truncated response gets that reward and counts as
    incorrect for the critic, whose V must estimate the chance of the reward A = R - V uses."""
    prompt_ids = c.prompt_ids(records)
    rows_prompt, rows_resp, rows_lp, group, truncated = [], [], [], [], []
    for i, samples in enumerate(rollouts["samples"]):
        for s in samples:
            s: Sample
            rows_prompt.append(prompt_ids[i])
            rows_resp.append(list(s.token_ids))
            rows_lp.append(list(s.logprobs))
            group.append(i)
            truncated.append(s.truncated)
    tensors = pad_rollouts(rows_prompt, rows_resp, rows_lp,
                           pad_id=c.tokenizer.pad_token_id or 0)
    truncated_t = torch.tensor(truncated, dtype=torch.bool)
    rewards, correctness = step_outcomes(cfg, scored, truncated_t)
    loss_mask = tensors.response_mask
    if not cfg.algorithm.truncated_in_loss:
        loss_mask = loss_mask * (~truncated_t).float()[:, None]
    batch = StepBatch(tensors=tensors, group_index=torch.tensor(group), rewards=rewards,
                      correctness=correctness,
                      truncated=truncated_t, loss_mask=loss_mask)
    if "greedy_rewards" in scored.metrics:
        greedy = torch.tensor(scored.metrics.pop("greedy_rewards"), dtype=torch.float32)
        batch.greedy_rewards = greedy[batch.group_index]
    if c.critic is not None and cfg.algorithm.estimator == "sppo":
        ids, lengths = c.critic_inputs(records, prompt_ids)
        batch.critic_prompt_ids, batch.critic_prompt_lengths = ids[group], lengths[group]
    return batch


def build_engine_for(cfg: Config, hf_dir: Path, output_dir: Path):
    """The rollout engine on global rank 0 (None elsewhere). Servers the trainer launches are
    checked against its torch stack first (:mod:`megatron_sppo.rollout.sglang_stack`)."""
    from megatron_sppo.rollout import build_engine

    if dist.get_rank() != 0:
        return None
    if cfg.rollout.engine == "local":
        return build_engine("local", hf_path=hf_dir)
    s = cfg.rollout.sglang
    sync = "tensor" if s.colocated else "distributed"
    if not s.addresses:
        from megatron_sppo.rollout.sglang_stack import check_stacks, torch_stack

        check_stacks(torch_stack(), torch_stack(s.python), sync)
    model_path = Path(s.model_path) if s.model_path else hf_dir
    return build_engine(
        "sglang", model_path=str(model_path), addresses=s.addresses, python=s.python,
        replicas=s.replicas, tp_size=s.tp_size, port=s.port, base_gpu_id=s.base_gpu_id,
        mem_fraction_static=s.mem_fraction_static, enable_memory_saver=s.enable_memory_saver,
        enable_deterministic_inference=s.enable_deterministic_inference,
        dtype=s.dtype, quantization=s.quantization, startup_timeout_s=s.startup_timeout_s,
        request_timeout_s=s.request_timeout_s, bucket_mb=s.bucket_mb,
        log_dir=str(output_dir / "sglang_logs"), sync=sync, n_mode=s.n_mode,
        payload=sglang_payload(cfg, hf_dir, model_path),
        master_address=sync_master_address(cfg), master_port=s.sync_master_port)


def sync_master_address(cfg: Config) -> str:
    """Rank 0's address for the weight broadcast as the SGLang servers see it."""
    import socket

    s = cfg.rollout.sglang
    if s.sync_master_address:
        return s.sync_master_address
    return socket.getfqdn() if s.addresses else "127.0.0.1"


def sglang_payload(cfg: Config, hf_dir: Path, model_path: Path) -> str:
    """``bf16`` or ``fp8_block``: what the servers loading ``model_path`` need pushed (a
    bf16 push to an online-FP8 server is refused with the reason)."""
    import json

    from megatron_sppo.models.hf_config import arch_from_hf_config, load_hf_config
    from megatron_sppo.quant.fp8_block import check_sglang_block_layout, sync_payload_format

    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise UserError(f"rollout.sglang.model_path={model_path} has no config.json: give an HF "
                        "model directory")
    payload = sync_payload_format(cfg.rollout.sglang.quantization,
                                  json.loads(config_file.read_text()))
    if payload == "fp8_block":
        check_sglang_block_layout(arch_from_hf_config(load_hf_config(hf_dir)),
                                  cfg.rollout.sglang.tp_size)
    return payload


def build_components(cfg: Config) -> Components:
    """Collective: initialise distributed state and build everything the loop needs."""
    from megatron_sppo.runtime import init_distributed
    from megatron_sppo.trainer.models import checkpoint_source
    from megatron_sppo.trainer.sources import resolve_checkpoint_path

    init_distributed(cfg.policy.tensor_model_parallel_size,
                     cfg.policy.pipeline_model_parallel_size, cfg.trainer.seed)
    out = Path(cfg.trainer.output_dir)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    policy_ckpt = resolve_checkpoint_path(cfg.policy.checkpoint)
    hf_dir = checkpoint_source(policy_ckpt)[0]
    # SGLang sizes its KV cache once, from the free memory of its GPUs: the servers start
    # before any Megatron state exists, and colocated ones let go of everything before the
    # models are built (the first sync brings their weights back)
    engine = build_engine_for(cfg, hf_dir, out)
    try:
        return _build_around_engine(cfg, engine, policy_ckpt, hf_dir)
    except BaseException:  # the servers are up: stop them
        if engine is not None:
            engine.shutdown()
        raise


def _build_around_engine(cfg: Config, engine, policy_ckpt: str, hf_dir: Path) -> Components:
    import warnings

    from transformers import AutoTokenizer

    from megatron_sppo.trainer.models import build_trained_model
    from megatron_sppo.trainer.reference import build_reference
    from megatron_sppo.trainer.sources import (build_prompt_source, build_scorer,
                                               load_records, resolve_checkpoint_path)

    s = cfg.rollout.sglang
    colocation = Colocation(engine, [], enabled=cfg.rollout.engine == "sglang" and s.colocated,
                            release_engine=s.enable_memory_saver)
    if dist.get_world_size() > 1:
        dist.barrier()  # no rank allocates while the servers size their KV cache
    colocation.release(WEIGHTS + CACHES)
    total = cfg.trainer.total_steps
    policy = build_trained_model("policy", cfg.policy, policy_ckpt, total)
    tokenizer = AutoTokenizer.from_pretrained(policy.hf_dir)
    critic = critic_tokenizer = None
    if cfg.algorithm.needs_critic:
        critic_ckpt = resolve_checkpoint_path(cfg.critic.checkpoint or cfg.policy.checkpoint)
        critic = build_trained_model("critic", cfg.critic, critic_ckpt, total)
        critic_tokenizer = AutoTokenizer.from_pretrained(critic.hf_dir)
        if same_tokenizer(tokenizer, critic_tokenizer):
            critic_tokenizer = None
        elif dist.get_rank() == 0:
            mismatch = special_token_mismatch(tokenizer, critic_tokenizer)
            warnings.warn("the critic's tokenizer differs from the policy's: the critic reads "
                          "the prompt re-tokenized with its own chat template"
                          + (f"; special tokens not shared: {', '.join(mismatch)}"
                             if mismatch else ""), stacklevel=2)
    reference = build_reference(cfg, policy_ckpt) if cfg.algorithm.needs_reference else None
    c = Components(cfg=cfg, policy=policy, critic=critic, reference=reference,
                   tokenizer=tokenizer, critic_tokenizer=critic_tokenizer,
                   prompts=build_prompt_source(cfg, tokenizer), engine=engine,
                   colocation=colocation)
    colocation.models = list(c.trainable().values())
    if cfg.data.eval_files:
        c.eval_records = load_records(cfg, cfg.data.eval_files, "eval")
    if dist.get_rank() == 0:
        c.scorer = build_scorer(cfg)
    payload = (sglang_payload(cfg, hf_dir, Path(s.model_path) if s.model_path else hf_dir)
               if cfg.rollout.engine == "sglang" else "bf16")
    c.weight_sync = build_weight_sync(cfg, engine, policy, payload)
    c.sync_weights(0)
    return c
