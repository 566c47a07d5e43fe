"""``python -m dpl.report``: tables and figures of a sweep (see :func:`dpl.report.main`)."""

import sys

from dpl.report import main

sys.exit(main())
