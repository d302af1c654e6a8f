"""Allows `python -m osbuilder`."""

import sys

from osbuilder.cli import main

sys.exit(main())
