"""``python -m train``: one run; see ``train/cli.py`` or ``python -m train --help``."""
import sys

from .cli import main

sys.exit(main())
