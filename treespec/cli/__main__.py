"""``python -m treespec.cli``: the ``treespec`` command, for where the console script is not on PATH
(``torchrun -m treespec.cli train``, subprocesses started with ``sys.executable``)."""

import sys

from . import main

sys.exit(main())
