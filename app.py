"""The seed's `python app.py --checkpoint PATH`: the chat web page (same as `tinylm ui`, with its options)."""

import sys

from tinylm.cli import main

sys.exit(main(["ui", *sys.argv[1:]]))
