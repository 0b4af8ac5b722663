#!/usr/bin/env python
"""Convert a Hugging Face checkpoint to Megatron-LM's dist-checkpoint layout.

    python tools/convert_hf_to_megatron.py --hf-path DIR --megatron-path DIR [--tp N] [--pp N]

Same as `megatron-sppo convert hf-to-megatron`; see --help.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sppo.cli import add_hf_to_megatron_args, run_hf_to_megatron, run_tool  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_hf_to_megatron_args(parser)
    sys.exit(run_tool(run_hf_to_megatron, parser.parse_args()))
