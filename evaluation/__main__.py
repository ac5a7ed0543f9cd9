"""``python -m evaluation DATASET_DIR …`` — the same command as ``python -m pipeline eval``."""

import sys

from pipeline.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
