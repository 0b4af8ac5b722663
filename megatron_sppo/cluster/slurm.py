"""Slurm batch scripts for training runs, rendered from one small dataclass.

The scripts are generated rather than hand-edited so that the layout arithmetic (GPUs per
model replica, SGLang servers per node) is checked once, here, before anything is queued, and
so that the parallel layout the script validates is exactly the one the trainer runs: the
script passes it as config overrides and refuses user overrides of the same keys.

Placements:

* ``colocated``: trainer and SGLang share the trainer's GPUs. Global rank 0 launches
  ``gpus_per_node / sglang_tp`` servers on the head node (``rollout.sglang.replicas``).
* ``disaggregated``: ``rollout_nodes`` extra nodes run only SGLang servers (one per
  ``sglang_tp`` GPUs, consecutive ports); the trainer attaches to them through
  ``rollout.sglang.addresses=host:port,...``.

CPU jobs (``gpus_per_node=0``): no GPU directives, one rank per ``cpus_per_rank`` CPUs of
each node (counted by the script from ``SLURM_CPUS_ON_NODE``) and the local rollout engine,
so the same script runs on a CPU cluster (tests/test_preemption.py runs it on a real one).

Time limit: Slurm sends SIGUSR1 to the batch shell ``signal_lead_s`` before the limit
(``--signal=B:USR1@...``). The shell forwards it through srun, which signals every process
of the step, and torchrun forwards it to its workers' process groups
(``--signals-to-handle``, torch >= 2.9). The trainer finishes its step, checkpoints, writes
``stopped.json`` and exits; the shell then calls ``scontrol requeue`` and the requeued job
continues with ``--resume auto``. The shell requeues whenever the trainer left
``stopped.json``, so a manual ``scancel --signal=USR1`` (which reaches the steps only)
requeues too; a trainer that finished or failed is not requeued.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from pathlib import Path, PurePosixPath

from megatron_sppo.errors import UserError
from megatron_sppo.rollout.sglang_launcher import (DEFAULT_SGLANG_PYTHON, LaunchOptions,
                                                   replica_options, server_command)
from megatron_sppo.trainer.preemption import LEAD_ENV, STOPPED

PLACEMENTS = ("colocated", "disaggregated")

# Config keys the script sets from the layout; a user override of one would run a layout
# other than the one checked here.
LAYOUT_KEYS = ("trainer.output_dir", "policy.tensor_model_parallel_size",
               "policy.pipeline_model_parallel_size", "critic.tensor_model_parallel_size",
               "critic.pipeline_model_parallel_size", "rollout.engine", "rollout.sglang.tp_size",
               "rollout.sglang.replicas", "rollout.sglang.addresses", "rollout.sglang.colocated")

# torchrun handles these by stopping its workers with the same signal; SIGUSR1 must be among
# them, or torchrun dies of it (default action) before the trainer can checkpoint.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

# Slurm's --time forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_DAYS = re.compile(r"^(\d+)-(\d+)(?::(\d+))?(?::(\d+))?$")
_TIME = re.compile(r"^(\d+)(?::(\d+))?(?::(\d+))?$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm ``--time`` value (UserError if it is not one)."""
    if m := _TIME_DAYS.match(text):
        days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if m := _TIME.match(text):
        parts = [int(g) for g in m.groups() if g is not None]
        if len(parts) == 3:  # HH:MM:SS
            return (parts[0] * 60 + parts[1]) * 60 + parts[2]
        return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)  # MM or MM:SS
    raise UserError(f"time limit {text!r} is not a Slurm time (MM, HH:MM:SS, D-HH:MM, ...)")


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """One training job. Paths are absolute and the same on every node and inside the
    container (mount the shared filesystem at its own path, e.g. ``/lustre:/lustre``).

    ``nodes`` counts trainer nodes; ``rollout_nodes`` the extra SGLang nodes of a
    disaggregated job. ``sglang_model`` is the HF directory those servers start from.
    ``gpus_per_node=0`` makes a CPU job: one rank per ``cpus_per_rank`` CPUs (default 1).
    """

    job_name: str
    config: str
    output_dir: str
    nodes: int = 1
    gpus_per_node: int = 8
    placement: str = "colocated"
    rollout_nodes: int = 0
    policy_tp: int = 1
    policy_pp: int = 1
    sglang_tp: int = 1
    sglang_model: str | None = None
    sglang_port: int = 30000
    sglang_python: str = DEFAULT_SGLANG_PYTHON
    sglang_mem_fraction: float = 0.85
    sglang_args: tuple[str, ...] = ()
    time_limit: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()
    rdzv_port: int = 29500
    signal_lead_s: int = 120
    max_requeues: int = 10
    nccl_socket_ifname: str | None = None
    nccl_ib_hca: str | None = None
    overrides: tuple[str, ...] = ()
    cpus_per_rank: int | None = None

    @property
    def on_cpu(self) -> bool:
        return self.gpus_per_node == 0

    @property
    def trainer_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel_size(self) -> int:
        return self.trainer_gpus // (self.policy_tp * self.policy_pp)

    @property
    def total_nodes(self) -> int:
        return self.nodes + self.rollout_nodes

    @property
    def servers_per_node(self) -> int:
        """SGLang servers on each GPU node that hosts them (one per ``sglang_tp`` GPUs)."""
        return self.gpus_per_node // self.sglang_tp

    def check(self) -> None:
        """Every check that needs no cluster: names, paths, counts and the placement."""
        if not _SAFE_NAME.match(self.job_name):
            raise UserError(f"job name {self.job_name!r}: use letters, digits, '.', '_', '-'")
        for what, value in (("nodes", self.nodes), ("policy tp", self.policy_tp),
                            ("policy pp", self.policy_pp), ("sglang tp", self.sglang_tp),
                            ("cpus per rank", self.cpus_per_rank),
                            ("signal lead seconds", self.signal_lead_s)):
            if value is not None and value < 1:
                raise UserError(f"{what} = {value}: must be >= 1")
        if self.gpus_per_node < 0:
            raise UserError(f"gpus per node = {self.gpus_per_node}: must be >= 0 (0: a CPU job)")
        if self.max_requeues < 0:
            raise UserError(f"max requeues = {self.max_requeues}: must be >= 0")
        for what, port, last in (("rendezvous port", self.rdzv_port, 65535),
                                 ("sglang port", self.sglang_port, 65536 - self.servers_per_node)):
            if not 1024 <= port <= last:
                raise UserError(f"{what} {port} is outside 1024..{last}")
        if not 0 < self.sglang_mem_fraction < 1:
            raise UserError(f"sglang mem fraction {self.sglang_mem_fraction} must be in (0, 1)")
        limit = time_limit_seconds(self.time_limit)
        if not 0 < self.signal_lead_s < min(limit, 65536):
            raise UserError(f"signal lead {self.signal_lead_s} s must be below the time limit "
                            f"{self.time_limit} and at most 65535 s (it must also cover one "
                            "training step plus a checkpoint)")
        for value in (self.partition, self.account):
            if value is not None and not _SAFE_NAME.match(value):
                raise UserError(f"partition/account {value!r}: use letters, digits, '.', '_', '-'")
        self._check_placement()
        self._check_paths()
        self._check_overrides()

    def _check_placement(self) -> None:
        if self.placement not in PLACEMENTS:
            raise UserError(f"placement {self.placement!r}: choose one of {', '.join(PLACEMENTS)}")
        if self.cpus_per_rank is not None and not self.on_cpu:
            raise UserError("cpus per rank is for CPU jobs (gpus per node 0); a GPU job runs "
                            "one rank per GPU")
        if self.on_cpu:  # the ranks per node are known at run time; the script checks them
            if self.placement != "colocated" or self.rollout_nodes:
                raise UserError("a CPU job (gpus per node 0) runs the local rollout engine: use "
                                "placement colocated and 0 rollout nodes")
            return
        mp = self.policy_tp * self.policy_pp
        if self.gpus_per_node % self.policy_tp:
            raise UserError(f"policy tp {self.policy_tp} does not divide {self.gpus_per_node} GPUs "
                            "per node: tensor parallel groups must not span nodes")
        if self.trainer_gpus % mp:
            raise UserError(f"policy tp x pp = {mp} does not divide the {self.trainer_gpus} "
                            f"trainer GPUs ({self.nodes} nodes x {self.gpus_per_node}): change "
                            "nodes, tp or pp")
        if self.gpus_per_node % self.sglang_tp:  # hence also the rollout GPUs in all
            raise UserError(f"sglang tp {self.sglang_tp} does not divide {self.gpus_per_node} "
                            "GPUs per node: each SGLang server must fit on one node")
        if self.placement == "colocated":
            if self.rollout_nodes:
                raise UserError(f"{self.rollout_nodes} rollout nodes with placement colocated: "
                                "use placement disaggregated, or 0 rollout nodes")
            return
        if self.rollout_nodes < 1:
            raise UserError("placement disaggregated needs at least 1 rollout node")
        if not self.sglang_model:
            raise UserError("placement disaggregated needs the HF model directory the SGLang "
                            "servers start from (sglang model)")

    def _check_paths(self) -> None:
        paths = {"config": self.config, "output dir": self.output_dir}
        if self.sglang_model:
            paths["sglang model"] = self.sglang_model
        for what, path in paths.items():
            if "\n" in path or not PurePosixPath(path).is_absolute():
                raise UserError(f"{what} {path!r} must be an absolute path on the shared "
                                "filesystem (the same on every node)")
        if not self.container_image:
            return
        mounts = [m.split(":") for m in self.container_mounts]
        for mount in mounts:
            if not 1 <= len(mount) <= 3 or any(not p for p in mount[:2]) or "," in "".join(mount):
                raise UserError(f"container mount {':'.join(mount)!r} is not SRC[:DST[:FLAGS]]")
        for what, path in paths.items():
            covering = [m for m in mounts if _is_under(path, m[1] if len(m) > 1 else m[0])]
            if not covering:
                raise UserError(f"{what} {path} is not under any container mount: mount the "
                                "shared filesystem, e.g. --container-mounts /lustre:/lustre")
            if len(covering[0]) > 1 and covering[0][0] != covering[0][1]:
                raise UserError(f"container mount {':'.join(covering[0])} maps {what} to another "
                                "path: mount the shared filesystem at its own path (SRC == DST)")

    def _check_overrides(self) -> None:
        for text in self.overrides:
            key = text.split("=", 1)[0]
            if "=" not in text or not key:
                raise UserError(f"override {text!r} is not key=value")
            if key in LAYOUT_KEYS:
                raise UserError(f"override {key} is set by the job layout: use the renderer's "
                                "options (nodes, tp, pp, placement, output dir) instead")


def _is_under(path: str, root: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(root) or PurePosixPath(root) in PurePosixPath(
        path).parents


def layout_overrides(job: SlurmJob) -> list[str]:
    """The ``key=value`` overrides the script appends (``$SGLANG_ADDRESSES`` is filled in at run
    time from the rollout nodes' hostnames)."""
    out = [f"trainer.output_dir={job.output_dir}"]
    for model in ("policy", "critic"):  # the trainer runs the critic on the policy's layout
        out += [f"{model}.tensor_model_parallel_size={job.policy_tp}",
                f"{model}.pipeline_model_parallel_size={job.policy_pp}"]
    if job.on_cpu:
        return out + ["rollout.engine=local"]
    out += ["rollout.engine=sglang", f"rollout.sglang.tp_size={job.sglang_tp}"]
    if job.placement == "colocated":
        out.append(f"rollout.sglang.replicas={job.servers_per_node}")
    else:
        out += ["rollout.sglang.addresses=$SGLANG_ADDRESSES", "rollout.sglang.colocated=false"]
    return out


def torchrun_args(job: SlurmJob) -> list[str]:
    """torchrun's options, one rendezvous per job on the first trainer node."""
    nproc = "$NPROC_PER_NODE" if job.on_cpu else job.gpus_per_node
    return ["torchrun", f"--nnodes={job.nodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=$HEAD_NODE:{job.rdzv_port}",
            "--rdzv-id=$SLURM_JOB_ID", f"--signals-to-handle={TORCHRUN_SIGNALS}",
            f"--shutdown-timeout={job.signal_lead_s}"]


def sglang_servers(job: SlurmJob) -> list[LaunchOptions]:
    """The servers each rollout node runs: consecutive GPU blocks of ``sglang_tp`` and ports."""
    base = LaunchOptions(model_path=job.sglang_model, python=job.sglang_python, host="0.0.0.0",
                         port=job.sglang_port, tp_size=job.sglang_tp,
                         mem_fraction_static=job.sglang_mem_fraction,
                         extra_args=tuple(job.sglang_args))
    return replica_options(base, job.servers_per_node)


def _q(value) -> str:
    return shlex.quote(str(value))


def _element(text: str, expand: bool = False) -> str:
    """``text`` as one array element: literal, or (``expand``) double-quoted so that its
    ``$NAME`` variables expand. Words with commas are quoted too: shellcheck takes a bare
    comma in an array for a mistaken separator."""
    if expand and "$" in text:
        if re.search(r'["\\`]|\$(?![A-Z_]+)', text):
            raise ValueError(f"cannot double-quote {text!r}")
        return f'"{text}"'
    word = _q(text)
    return f"'{word}'" if "," in word and not word.startswith("'") else word


def _continued(words: list[str]) -> str:
    return " \\\n  ".join(words)


_NETWORK_NOTES = """\
# ---- Network. Wrong interfaces are the usual cause of NCCL hangs at the first collective.
# NCCL_SOCKET_IFNAME: interface(s) for NCCL's bootstrap and socket traffic, e.g. ib0, eth0,
#   or an exclusion such as ^lo,docker0 ('ip -br addr' on a compute node lists them).
# GLOO_SOCKET_IFNAME: the same for gloo groups (megatron-core uses some for CPU tensors).
# NCCL_IB_HCA: the InfiniBand/RoCE adapters NCCL may use, e.g. mlx5_0,mlx5_1 or =mlx5_0:1
#   ('ibv_devinfo' lists them); unset lets NCCL use every active one.
# NCCL_DEBUG=INFO with NCCL_DEBUG_SUBSYS=INIT,NET prints the transports NCCL chose.
# NCCL_IB_TIMEOUT / NCCL_IB_RETRY_CNT: raise them on congested fabrics that drop connections.
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a failed or timed-out collective ends the job instead of
#   leaving it hung until the time limit."""


def _summary(job: SlurmJob) -> str:
    if job.on_cpu:
        return (f"CPU; {job.nodes} node(s), one rank per {job.cpus_per_rank or 1} CPU(s) "
                f"(tp {job.policy_tp}, pp {job.policy_pp}); local rollout engine.")
    if job.placement == "disaggregated":
        rollout = (f"{job.rollout_nodes} SGLang node(s) x {job.servers_per_node} server(s) "
                   f"(tp {job.sglang_tp})")
    else:
        rollout = f"{job.servers_per_node} SGLang server(s) (tp {job.sglang_tp}) on the head node"
    return (f"{job.placement}; {job.nodes} trainer node(s) x {job.gpus_per_node} GPUs (tp "
            f"{job.policy_tp}, pp {job.policy_pp}, dp {job.data_parallel_size}); {rollout}.")


def _header(job: SlurmJob, rendered_by: str | None) -> list[str]:
    gpus = [] if job.on_cpu else [f"#SBATCH --gpus-per-node={job.gpus_per_node}"]
    lines = [
        "#!/bin/bash",
        f"# {job.job_name}: {_summary(job)}",
        f"# Rendered by: {rendered_by or 'tools/render_slurm.py'}",
        "# Slurm opens the log before this script runs, so create the output directory first:",
        f"#   mkdir -p {_q(job.output_dir)} && sbatch THIS_FILE",
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.total_nodes}",
        "#SBATCH --ntasks-per-node=1",
        *gpus,
        "#SBATCH --exclusive",
        f"#SBATCH --time={job.time_limit}",
        f"#SBATCH --output={job.output_dir.rstrip('/')}/slurm-%x-%j.out",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal=B:USR1@{job.signal_lead_s}",
        "#SBATCH --requeue",
    ]
    lines += [f"#SBATCH --partition={job.partition}"] if job.partition else []
    lines += [f"#SBATCH --account={job.account}"] if job.account else []
    return lines


def _export(name: str, value: str | None, example: str) -> str:
    return f"export {name}={_q(value)}" if value else f"# export {name}={example}"


def _gpu_environment(job: SlurmJob) -> list[str]:
    ifname = job.nccl_socket_ifname
    # gloo takes interface names only, not NCCL's ^exclusions or =exact matches
    gloo_ifname = ifname if ifname and ifname[0] not in "^=" else None
    return [_NETWORK_NOTES, _export("NCCL_SOCKET_IFNAME", ifname, "ib0"),
            _export("GLOO_SOCKET_IFNAME", gloo_ifname, "ib0"),
            _export("NCCL_IB_HCA", job.nccl_ib_hca, "mlx5_0,mlx5_1"),
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
            "# Megatron-LM's sequence parallelism needs each TP all-gather queued before the GEMM "
            "that reads it.",
            "export CUDA_DEVICE_MAX_CONNECTIONS=1"]


def _cpu_environment(job: SlurmJob) -> list[str]:
    cpus, tp = job.cpus_per_rank or 1, job.policy_tp
    bad = '[ "$NPROC_PER_NODE" -lt 1 ]' + (f" || [ $((NPROC_PER_NODE % {tp})) -ne 0 ]"
                                           if tp > 1 else "")
    return [
        "# ---- Network: gloo carries a CPU job's collectives. GLOO_SOCKET_IFNAME: the interface",
        "# between nodes, e.g. eth0 ('ip -br addr' on a compute node lists them).",
        _export("GLOO_SOCKET_IFNAME", job.nccl_socket_ifname, "eth0"), "",
        f"# ---- Ranks: one per {cpus} CPU(s) of each node, each with as many threads.",
        f"export OMP_NUM_THREADS={cpus}",
        f"NPROC_PER_NODE=$((SLURM_CPUS_ON_NODE / {cpus}))",
        f"if {bad}; then",
        f'  echo "error: $SLURM_CPUS_ON_NODE CPUs per node give $NPROC_PER_NODE rank(s) of {cpus} '
        f'CPU(s), need a positive multiple of tp {tp}: change --cpus-per-rank or --tp" >&2',
        "  exit 2",
        "fi"]


def _environment(job: SlurmJob) -> list[str]:
    lines = ["", "set -euo pipefail", "", f"CONFIG={_q(job.config)}",
             f"OUTPUT_DIR={_q(job.output_dir)}", "export OUTPUT_DIR",
             'mkdir -p "$OUTPUT_DIR"',
             "# the trainer reports a checkpoint that cannot complete before the time limit",
             f"export {LEAD_ENV}={job.signal_lead_s}", ""]
    lines += _cpu_environment(job) if job.on_cpu else _gpu_environment(job)
    return lines + [
        "",
        "# ---- Nodes: trainer nodes first; the first one hosts torchrun's rendezvous.",
        'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        f'TRAIN_NODELIST=$(IFS=,; echo "${{NODES[*]:0:{job.nodes}}}")',
        "HEAD_NODE=${NODES[0]}"]


def _step_options(job: SlurmJob) -> list[str]:
    """srun options shared by the job's steps: one task per node owning the node's GPUs and
    CPUs (srun would otherwise give a task one CPU), inside the container if one is set."""
    gpus = [] if job.on_cpu else [f"--gpus-per-node={job.gpus_per_node}"]
    opts = ["--ntasks-per-node=1", *gpus, '--cpus-per-task="$SLURM_CPUS_ON_NODE"']
    if job.container_image:
        opts.append(f"--container-image={_q(job.container_image)}")
        if job.container_mounts:
            opts.append(f"--container-mounts={_q(','.join(job.container_mounts))}")
    return opts


def _sglang_step(job: SlurmJob) -> list[str]:
    last_port = job.sglang_port + job.servers_per_node - 1
    lines = ["", f'ROLLOUT_NODES=("${{NODES[@]:{job.nodes}}}")',
             'ROLLOUT_NODELIST=$(IFS=,; echo "${ROLLOUT_NODES[*]}")',
             'SGLANG_ADDRESSES=""',
             'for node in "${ROLLOUT_NODES[@]}"; do',
             f"  for port in $(seq {job.sglang_port} {last_port}); do",
             '    SGLANG_ADDRESSES+="${SGLANG_ADDRESSES:+,}$node:$port"',
             "  done",
             "done", "",
             f"# ---- SGLang: {job.servers_per_node} server(s) per rollout node on blocks of "
             f"{job.sglang_tp} GPU(s), logs in $OUTPUT_DIR/sglang_logs;",
             "# the trainer waits for their /health before its first rollout. They ignore SIGUSR1",
             "# (scancel --signal=USR1 reaches every step): it is the trainer's cue to checkpoint.",
             "SGLANG_SERVERS=$(cat <<'EOF'",
             "trap '' USR1",
             'mkdir -p "$OUTPUT_DIR/sglang_logs"']
    for opts in sglang_servers(job):
        lines.append(f'{shlex.join(server_command(opts))} '
                     f'>"$OUTPUT_DIR/sglang_logs/$(hostname)-{opts.port}.log" 2>&1 &')
    return lines + ["wait", "EOF", ")",
                    _continued(["srun", f"--nodes={job.rollout_nodes}",
                                f"--ntasks={job.rollout_nodes}", '--nodelist="$ROLLOUT_NODELIST"',
                                *_step_options(job), 'bash -c "$SGLANG_SERVERS" &']),
                    "SGLANG_PID=$!",
                    'trap \'kill "$SGLANG_PID" 2>/dev/null || true\' EXIT']


def _trainer_step(job: SlurmJob) -> list[str]:
    return [
        "",
        "# ---- Trainer: one torchrun per node. SIGUSR1 reaches every process of the step through",
        "# srun, and every rank's process group through torchrun (--signals-to-handle needs",
        "# torch >= 2.9); the trainer's helper processes are shielded from it.",
        "TRAIN_CMD=(",
        *(f"  {_element(w, expand=True)}" for w in torchrun_args(job)),
        '  --no-python megatron-sppo train --config "$CONFIG"',
        *(f"  {_element(o)}" for o in job.overrides),
        *(f"  {_element(o, expand=True)}" for o in layout_overrides(job)),
        "  --resume auto",
        ")",
        "",
        "STOP_REQUESTED=0",
        "WAIT_INTERRUPTED=0",
        "# shellcheck disable=SC2317  # runs from the trap below",
        "on_usr1() {",
        "  STOP_REQUESTED=1",
        "  WAIT_INTERRUPTED=1",
        f'  echo "$(date -Is) time limit in {job.signal_lead_s} s: the trainer checkpoints after '
        'its step, then exits"',
        '  kill -USR1 "$TRAIN_PID" 2>/dev/null || true',
        "}",
        "trap on_usr1 USR1",
        "",
        "# --kill-on-bad-exit: ranks that die take the job down instead of leaving the others",
        "# hung in a collective (a checkpoint is complete when any rank returns from saving).",
        _continued(["srun", f"--nodes={job.nodes}", f"--ntasks={job.nodes}",
                    '--nodelist="$TRAIN_NODELIST"', "--kill-on-bad-exit=1", *_step_options(job),
                    '"${TRAIN_CMD[@]}" &']),
        "TRAIN_PID=$!",
        "",
        "# A trapped signal ends 'wait' early: wait again until srun itself has exited.",
        "while :; do",
        "  WAIT_INTERRUPTED=0",
        "  status=0",
        '  wait "$TRAIN_PID" || status=$?',
        '  [ "$WAIT_INTERRUPTED" = 1 ] || break',
        "done",
        "",
        "# The trainer leaves stopped.json when a signal (this script's, or scancel --signal=USR1",
        "# sent to the steps) stopped it with a complete checkpoint and steps left.",
        f'STOPPED="$OUTPUT_DIR/{STOPPED}"',
        'if [ -f "$STOPPED" ]; then',
        f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {job.max_requeues} ]; then',
        '    echo "$(date -Is) stopped at a checkpoint: $(cat "$STOPPED"); requeueing job '
        '$SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}); it continues with --resume auto"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "  else",
        f'    echo "$(date -Is) not requeueing: {job.max_requeues} restarts reached"',
        "  fi",
        'elif [ "$STOP_REQUESTED" = 1 ]; then',
        '  echo "$(date -Is) not requeueing: the trainer did not stop at a checkpoint (it finished, '
        'or failed with status $status)"',
        "fi",
        'exit "$status"']


def render_sbatch(job: SlurmJob, rendered_by: str | None = None) -> str:
    """The sbatch script for ``job`` (checked first). ``rendered_by``: the command line that
    produced it, recorded in the header so the script can be regenerated."""
    job.check()
    if rendered_by and "\n" in rendered_by:
        raise ValueError("rendered_by must be one line")
    lines = _header(job, rendered_by) + _environment(job)
    if job.placement == "disaggregated":
        lines += _sglang_step(job)
    return "\n".join(lines + _trainer_step(job)) + "\n"


def write_script(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file + rename), executable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path
