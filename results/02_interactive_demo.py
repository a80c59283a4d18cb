"""Serve the interactive demo (Gradio) on this machine; see `--help` and notes/03_interactive_demo.md.

A thin entry point: the app lives in `gpt2gen.demo`.
"""

import sys

from gpt2gen.demo import main

if __name__ == "__main__":
    sys.exit(main())
