"""``python -m bitsmith`` (what ``torchrun -m bitsmith run RECIPE`` starts in every process)."""

import sys

from bitsmith.cli import main

sys.exit(main())
