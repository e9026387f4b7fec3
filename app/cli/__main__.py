"""``python -m app.cli`` is ``poolrelay``."""

import sys

from app.cli import main

sys.exit(main())
