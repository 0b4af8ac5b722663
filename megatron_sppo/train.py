"""``python -m megatron_sppo.train --config FILE.yaml [key=value ...]``: the same as
``megatron-sppo train`` (handy under torchrun, which runs modules with -m)."""

import sys

from megatron_sppo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
