"""``python -m sts_callback ...``: the ``sts`` command, for an environment whose scripts folder is not on PATH."""

import sys

from .tools.cli import main

sys.exit(main())
