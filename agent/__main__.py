"""`python -m agent` is the `aimesh` command."""
import sys

from agent.cli import main

sys.exit(main())
