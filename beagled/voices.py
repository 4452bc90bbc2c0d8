"""The old name of ``beagled.adapter_dirs.AdapterDirs``, kept until ``beagled.daemon`` imports the new one."""

from beagled.adapter_dirs import AdapterDirs as VoiceStore

__all__ = ["VoiceStore"]
