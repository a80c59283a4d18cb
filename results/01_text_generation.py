"""Generate text samples with GPT-2 from the command line; see `--help` and the README.

A thin entry point: the code lives in `gpt2gen.apps.cli`.
"""

import sys

if __name__ == "__main__":
    try:
        from gpt2gen.apps.cli import main
    except KeyboardInterrupt:  # Ctrl-C while the libraries load: stop quietly
        sys.exit(130)
    sys.exit(main())
