#!/usr/bin/env python
"""Convert a Hugging Face checkpoint to Megatron-LM's dist-checkpoint layout.

    python tools/convert_hf_to_megatron.py --hf-path DIR --megatron-path DIR [--tp N] [--pp N]

Same as `megatron-sppo convert hf-to-megatron`; see --help.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-megatron", *sys.argv[1:]]))
