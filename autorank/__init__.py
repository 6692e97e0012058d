"""autorank: make on-device fine-tuning fit (ASI shortcut layers + per-layer rank search).

This module imports nothing heavy: `autorank.shortcut`, `autorank.plan` and `autorank.cost` are
the torch-only core a device installs; the search stack lives in the other subpackages.
"""

__version__ = "0.1.0"
