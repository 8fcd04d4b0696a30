"""`python3 -m orchestrator.agent SUBCOMMAND` (and the zipapp's entry point)."""

import sys

from .cli import main

sys.exit(main())
