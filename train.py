"""The seed's `python train.py`: trains the v2 preset on Dolly (same as `tinylm train`, which takes options)."""

import sys

from tinylm.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
