"""Serve the interactive demo (Gradio) on this machine; see `--help` and notes/03_interactive_demo.md.

A thin entry point: the app lives in `gpt2gen.apps.demo`.
"""

import sys

if __name__ == "__main__":
    try:
        from gpt2gen.apps.demo import main
    except KeyboardInterrupt:  # Ctrl-C while the libraries load: stop quietly
        sys.exit(130)
    sys.exit(main())
