"""Units shared by every layer (no imports: the torch-only core may use it).

MB is a MiB: 2**20 bytes (docs/ARCHITECTURE.md, "Units in names").
"""

MB = 2**20
