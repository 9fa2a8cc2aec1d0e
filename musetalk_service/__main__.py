"""`python -m musetalk_service` is the `musetalk-service` command."""

import sys

from musetalk_service.cli import main

sys.exit(main())
