"""`python -m resvae ...` (and `torchrun -m resvae train ...`)."""

import sys

from .cli import main

sys.exit(main())
