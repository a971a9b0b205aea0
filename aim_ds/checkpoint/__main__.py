"""`python -m aim_ds.checkpoint convert|reshard ...`: the `aim-ds` commands of the same names."""

import sys

from ..tools.cli import main

sys.exit(main(sys.argv[1:]))
