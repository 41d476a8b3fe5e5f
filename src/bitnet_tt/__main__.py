"""`python -m bitnet_tt`: the same as the `bitnet-tt` command."""

import sys

from .cli import main

sys.exit(main())
