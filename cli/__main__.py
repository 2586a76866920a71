"""`python -m credit_engine ...`: the `credit-engine` command (how the engine starts its own children)."""

import sys

from credit_engine.commands import main

sys.exit(main())
