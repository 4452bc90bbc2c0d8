"""beagled: a daemon that makes a writing model speak more like its user."""

__version__ = "0.1.0"
