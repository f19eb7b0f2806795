"""`python -m agent.mt_mini build | verify-step | dataset` (see agent.mt_mini.benchmark)."""
import sys

from agent.mt_mini.benchmark import main

sys.exit(main())
