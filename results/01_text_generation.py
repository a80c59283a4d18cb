"""Generate text samples with GPT-2 from the command line; see `--help` and the README.

A thin entry point: the code lives in `gpt2gen.cli`.
"""

import sys

from gpt2gen.cli import main

if __name__ == "__main__":
    sys.exit(main())
