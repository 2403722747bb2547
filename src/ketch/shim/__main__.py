"""``python -m ketch.shim``: the long-lived shim server that ``start`` launches."""

import sys

from ketch.shim.main import main

sys.exit(main())
