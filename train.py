"""`python train.py [options]` = `brainseg train [options]`: both models by default (see --help)."""

import sys

from brainseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
