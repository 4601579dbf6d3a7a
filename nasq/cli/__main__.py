"""``python -m nasq.cli``: the ``nasq`` command."""
import sys

from . import main

sys.exit(main())
