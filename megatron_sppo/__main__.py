import sys

from megatron_sppo.cli import main

sys.exit(main())
