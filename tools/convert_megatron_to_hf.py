#!/usr/bin/env python
"""Export a Megatron checkpoint (any TP/PP) to Hugging Face safetensors.

    python tools/convert_megatron_to_hf.py --megatron-path DIR --hf-path DIR [--overwrite]

Same as `megatron-sppo convert megatron-to-hf`; see --help.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", "megatron-to-hf", *sys.argv[1:]]))
