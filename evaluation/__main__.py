"""``python -m evaluation DATASET_DIR …`` — the same command as ``python -m pipeline eval``."""

import sys

from evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
