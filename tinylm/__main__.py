"""`python -m tinylm` (what torchrun runs) is the `tinylm` command."""

import sys

from tinylm.cli import main

sys.exit(main())
