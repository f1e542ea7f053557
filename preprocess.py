"""`python preprocess.py [options]` = `brainseg preprocess [options]` (see --help)."""

import sys

from brainseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
