"""``python -m beagled`` is ``beagled``."""

import sys

from beagled.cli import beagled_main

sys.exit(beagled_main())
