"""``python -m dpl.report``: tables and figures of a sweep (see :mod:`dpl.report`)."""

import sys

from dpl.report.cli import main

sys.exit(main())
