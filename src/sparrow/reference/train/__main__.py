"""`python -m sparrow.reference.train RUN_DIR ...`: see `sparrow.reference.train.cli`."""

from sparrow.reference.train.cli import main

main()
