"""``python -m tracking``: the ``tracking`` console script (see ``tracking.cli``)."""

import sys

from tracking.cli import main

sys.exit(main())
