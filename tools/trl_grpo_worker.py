#!/usr/bin/env python
"""The TRL side of tools/benchmark_vs_trl.py: TRL's GRPOTrainer on the demo task.

Runs only inside the benchmark's own TRL virtual environment (TRL is never a dependency of
megatron_sppo). Usage: ``python tools/trl_grpo_worker.py JOB.json`` where the benchmark's job
file names the warm-start HF model, the prompts (in the order megatron_sppo's trainer draws
them, with the prompt ids it builds), the GRPOConfig settings, the seed and the budget.

Writes into the job's ``output_dir``: ``settings.json`` (the full GRPOConfig as TRL resolved
it), ``steps.jsonl`` (per step, one generation batch and the optimizer steps on it: wall
seconds, phases, generated tokens, mean reward) and ``checkpoints/step_NNNNNN`` (HF
checkpoints at the evaluation steps and at the last step, saved outside the timed region) for
the benchmark's held-out evaluator, which is megatron_sppo's.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def arithmetic_reward(max_tokens: int, eos_ids: set[int]):
    """1 when the last boxed integer is the answer (the task's own check, from the checkout:
    megatron_sppo is not installed in this environment), else 0; a response cut at the
    length limit earns 0, as megatron_sppo's ``algorithm.truncated_reward=0`` gives it."""
    sys.path.insert(0, str(REPO))
    from megatron_sppo.data.arithmetic import boxed_answer

    def reward(completions, answer, completion_ids, **_):
        out = []
        for completion, truth, ids in zip(completions, answer, completion_ids):
            text = completion[0]["content"] if isinstance(completion, list) else completion
            truncated = len(ids) >= max_tokens and ids[-1] not in eos_ids
            got = boxed_answer(text)
            out.append(float(not truncated and got is not None and int(got) == int(truth)))
        return out

    return reward


def build_trainer(job: dict):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its step phases timed (generation, reward, the rest of the
        rollout batch's preparation); the update is the step's remainder."""

        phases: dict

        @contextmanager
        def _phase(self, name: str):
            start = time.perf_counter()
            yield
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

        def _generate_single_turn(self, *args, **kwargs):
            with self._phase("generation"):
                ids, logprobs = super()._generate_single_turn(*args, **kwargs)
            self.phases["tokens"] = self.phases.get("tokens", 0) + sum(map(len, ids))
            return ids, logprobs

        def _calculate_rewards(self, *args, **kwargs):
            with self._phase("reward"):
                rewards = super()._calculate_rewards(*args, **kwargs)
            self.phases["reward_mean"] = float(rewards.mean())
            return rewards

        def _generate_and_score_completions(self, *args, **kwargs):
            with self._phase("rollout_batch"):
                return super()._generate_and_score_completions(*args, **kwargs)

    class Clock(TrainerCallback):
        """A step, as in megatron_sppo, is one generation batch and the ``updates_per_step``
        optimizer steps that consume it. Its time = wall time between the ends of
        consecutive steps (data, generation, reward, loss, backward, clipping, optimizer,
        TRL's logging), checkpoint saving excluded; training stops at the budget."""

        def __init__(self, out: Path, job: dict):
            self.out, self.budget = out, job["max_train_seconds"]
            self.eval_interval, self.updates = job["eval_interval"], job["updates_per_step"]
            self.mark, self.seconds, self.total, self.trainer = None, 0.0, 0.0, None
            self.log = (out / "steps.jsonl").open("w")

        def on_train_begin(self, args, state, control, **kwargs):
            self.trainer.phases = {}
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.mark
            self.mark = time.perf_counter()
            if state.global_step % self.updates:
                return
            step, seconds, self.seconds = state.global_step // self.updates, self.seconds, 0.0
            self.total += seconds
            p, self.trainer.phases = self.trainer.phases, {}
            rollout = p.get("rollout_batch", 0.0)
            row = {"step": step, "seconds": seconds, "train_seconds": self.total,
                   "tokens": p.get("tokens", 0), "reward_mean": p.get("reward_mean"),
                   "time_generation": p.get("generation", 0.0),
                   "time_reward": p.get("reward", 0.0),
                   "time_batch_other": rollout - p.get("generation", 0.0) - p.get("reward", 0.0),
                   "time_update": seconds - rollout}
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
            done = self.total >= self.budget or state.global_step >= state.max_steps
            if done or step % self.eval_interval == 0:
                path = self.out / "checkpoints" / f"step_{step:06d}"
                self.trainer.model.save_pretrained(path)
                self.trainer.processing_class.save_pretrained(path)
            control.should_training_stop = done
            self.mark = time.perf_counter()

    out = Path(job["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(job["seed"])
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    rows = [json.loads(line) for line in Path(job["prompts"]).read_text().splitlines()]
    check_prompt_ids(tokenizer, rows[:64])
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "answer": r["answer"]} for r in rows])
    args = GRPOConfig(output_dir=str(out / "trl"), **job["grpo_config"])
    eos = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    clock = Clock(out, job)
    trainer = TimedGRPOTrainer(model=model, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[clock],
                               reward_funcs=arithmetic_reward(args.max_completion_length, eos))
    clock.trainer = trainer
    (out / "settings.json").write_text(json.dumps(args.to_dict(), indent=1, default=str))
    return trainer


def check_prompt_ids(tokenizer, rows: list[dict]) -> None:
    """TRL renders prompts with the chat template itself: they must be the token ids
    megatron_sppo's trainer feeds its engine, or the two runs see different inputs."""
    for r in rows:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        if list(ids) != r["prompt_ids"]:
            raise SystemExit(f"TRL tokenizes prompt {r['prompt']!r} as {list(ids)}, "
                             f"megatron_sppo as {r['prompt_ids']}: the runs would differ")


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[1]).read_text())
    trainer = build_trainer(job)
    trainer.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
