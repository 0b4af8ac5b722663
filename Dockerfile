# megatron-sppo on an NVIDIA NGC PyTorch image (torch, Transformer Engine and apex come from
# the image and are never replaced; SGLang lives in its own virtual environment).
#
# Build:
#   docker build -t megatron-sppo .
#   docker build -t megatron-sppo --build-arg NGC_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3 \
#       --build-arg SGLANG_VERSION=0.5.23 --build-arg SPPO_UID=$(id -u) .
#
# Run (the entrypoint prints the stack's versions, lists the GPUs and runs a tiny matmul on
# CUDA first; SPPO_SKIP_SMOKE=1 skips that check, e.g. on a machine without GPUs):
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v $PWD:/workspace megatron-sppo \
#       megatron-sppo --help
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v $PWD:/workspace megatron-sppo \
#       megatron-sppo convert hf-to-megatron --hf-path models/qwen --megatron-path ckpt/qwen --tp 2
#   docker run -e SPPO_SKIP_SMOKE=1 megatron-sppo megatron-sppo --help        # no GPU
#   SGLang: /opt/sglang-venv/bin/python -m sglang.launch_server ...  (its own torch pin)
#
# Slurm with enroot + pyxis:
#   enroot import dockerd://megatron-sppo            # writes ./megatron-sppo.sqsh
#   srun --gpus-per-node=8 --container-image=$PWD/megatron-sppo.sqsh \
#       --container-mounts=$PWD:/workspace --container-workdir=/workspace \
#       megatron-sppo --help
#   (pyxis runs the command as the calling user and skips ENTRYPOINT unless
#   --container-entrypoint is given; call `sppo-entrypoint megatron-sppo ...` to get the checks.)
#
# The package is installed editable from /opt/megatron_sppo (this build context). A checkout
# mounted at /workspace is imported instead only by `python -m megatron_sppo` run from
# /workspace; `pip install --no-deps -e /workspace` as root in a derived image switches over.

ARG NGC_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${NGC_IMAGE}

ARG MEGATRON_CORE_VERSION=0.19.2
ARG MODELOPT_VERSION=0.47.0
ARG TENSORBOARD_VERSION=2.21.0
ARG TRANSFORMERS_VERSION=5.23.0
ARG SGLANG_VERSION=0.5.23
# UID of the non-root user `sppo` (match the host user that owns bind-mounted directories;
# an existing account with this UID, such as Ubuntu's `ubuntu`, is removed).
ARG SPPO_UID=1000

SHELL ["/bin/bash", "-euo", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    SGLANG_VENV=/opt/sglang-venv

# Pins on what the image compiled against: torch (its own NVIDIA build) and, where present,
# Transformer Engine, apex, flash-attn, triton and numpy, at the versions their installed
# metadata declares: that is what pip compares (torch.__version__ may carry a local label such
# as +cu130 that the metadata lacks, and `torch==2.x+cu130` would then make pip fetch another
# torch). These pins replace the image's /etc/pip/constraint.txt, which pins every preinstalled
# package and would refuse e.g. the packaging>=24.2 megatron-core needs; they stay active
# (PIP_CONSTRAINT) for any later `pip install` in this image.
RUN mkdir -p /etc/pip \
 && python -c "import importlib.metadata as m, torch; \
have = {(d.metadata['Name'] or '').lower().replace('_', '-'): d.version for d in m.distributions()}; \
print(*[f'{n}=={have[n]}' for n in ('torch', 'transformer-engine', 'apex', 'flash-attn', 'triton', 'numpy') if n in have], sep=chr(10))" \
        > /etc/pip/megatron-sppo-constraint.txt \
 && grep -q '^torch==' /etc/pip/megatron-sppo-constraint.txt \
 && python -c "import torch; print(f'torch.__version__ {torch.__version__}; pins:')" \
 && cat /etc/pip/megatron-sppo-constraint.txt
ENV PIP_CONSTRAINT=/etc/pip/megatron-sppo-constraint.txt

# Python dependencies (setup.py's install_requires, with the versions that matter pinned).
RUN pip install -c /etc/pip/megatron-sppo-constraint.txt \
        "megatron-core==${MEGATRON_CORE_VERSION}" \
        "nvidia-modelopt==${MODELOPT_VERSION}" \
        "tensorboard==${TENSORBOARD_VERSION}" \
        "transformers==${TRANSFORMERS_VERSION}" \
        "safetensors>=0.4" "tokenizers>=0.21" "math-verify>=0.7" "PyYAML>=6.0" "psutil>=5.9" \
        "tqdm>=4.66" "requests>=2.31" "matplotlib>=3.8" "pyarrow>=15" \
 && test "$(python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))")" \
        = "$(grep '^torch==' /etc/pip/megatron-sppo-constraint.txt)"

# SGLang in its own virtual environment: its torch pin never touches the system torch.
# PIP_CONSTRAINT=/dev/null lifts every pin for it (an empty PIP_CONSTRAINT would not: pip
# ignores empty variables and would fall back to a pip.conf constraint).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/sglang-venv \
 && PIP_CONSTRAINT=/dev/null /opt/sglang-venv/bin/pip install --upgrade pip \
 && PIP_CONSTRAINT=/dev/null /opt/sglang-venv/bin/pip install "sglang[all]==${SGLANG_VERSION}" \
 && /opt/sglang-venv/bin/python -c "import importlib.metadata as m; print('sglang', m.version('sglang'))" \
 && test "$(python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))")" \
        = "$(grep '^torch==' /etc/pip/megatron-sppo-constraint.txt)"

# Non-root user.
RUN if [[ -n "${SPPO_UID}" ]] && getent passwd "${SPPO_UID}" > /dev/null; then \
        userdel --remove "$(getent passwd "${SPPO_UID}" | cut -d: -f1)" 2> /dev/null || true; \
    fi \
 && useradd --create-home --shell /bin/bash ${SPPO_UID:+--uid "${SPPO_UID}"} sppo \
 && mkdir -p /workspace \
 && chown sppo:sppo /workspace

# The package itself, without letting pip touch any dependency.
COPY . /opt/megatron_sppo
RUN pip install --no-deps -e /opt/megatron_sppo \
 && install -m 0755 /opt/megatron_sppo/tools/docker_entrypoint.sh /usr/local/bin/sppo-entrypoint \
 && python -c "import importlib.metadata as m, megatron_sppo, transformers; \
print('megatron_sppo', megatron_sppo.__version__, 'megatron-core', m.version('megatron-core'))" \
 && megatron-sppo --help > /dev/null

USER sppo
WORKDIR /workspace
ENTRYPOINT ["/usr/local/bin/sppo-entrypoint"]
CMD ["megatron-sppo", "--help"]
