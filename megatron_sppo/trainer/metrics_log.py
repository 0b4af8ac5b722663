"""Where a run's numbers go (rank 0 only): ``<output_dir>/metrics.jsonl`` (one JSON object per
step, appended and flushed, truncated to the resumed step on resume), TensorBoard scalars
under ``<output_dir>/tensorboard``, and a progress bar with ETA, reward and accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

# metrics.jsonl keys that go to TensorBoard under a section, e.g. "train/reward_mean"
_SECTIONS = {"time_": "time", "critic_": "critic", "eval/": ""}


def _tb_name(key: str) -> str:
    if "/" in key:
        return key
    for prefix, section in _SECTIONS.items():
        if key.startswith(prefix) and section:
            return f"{section}/{key}"
    return f"train/{key}"


def _clean(value):
    """JSON has no NaN/inf: write them as null so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, resumed: bool = False):
        self.path = Path(output_dir) / "metrics.jsonl"
        self._truncate_after(start_step if resumed else -1)
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                        purge_step=start_step + 1)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="sppo", unit="step",
                            dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (a resumed run recomputes them)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(_tb_name(key), value, step)
            self.writer.flush()
        if self.bar is not None and "reward_mean" in metrics:
            self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                                 acc=f"{metrics.get('accuracy', float('nan')):.3f}")
            self.bar.update(1)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
