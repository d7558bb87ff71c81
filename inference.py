"""The seed's `python inference.py --checkpoint PATH --prompt TEXT` (or `--chat`): same as `tinylm generate`."""

import sys

from tinylm.cli import main

sys.exit(main(["generate", *sys.argv[1:]]))
