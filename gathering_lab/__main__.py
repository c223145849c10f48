"""``python -m gathering_lab`` runs the ``gathering-lab`` command."""

import sys

from .cli import main

sys.exit(main())
