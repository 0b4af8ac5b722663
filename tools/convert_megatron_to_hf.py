#!/usr/bin/env python
"""Export a Megatron checkpoint (any TP/PP) to Hugging Face safetensors.

    python tools/convert_megatron_to_hf.py --megatron-path DIR --hf-path DIR [--overwrite]

Same as `megatron-sppo convert megatron-to-hf`; see --help.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cli import add_megatron_to_hf_args, run_megatron_to_hf, run_tool  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_megatron_to_hf_args(parser)
    sys.exit(run_tool(run_megatron_to_hf, parser.parse_args()))
