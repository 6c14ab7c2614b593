"""The names of the files that mark recast's outputs (shared by the writers and the runtime)."""

MANIFEST = "manifest.json"  # a bundle's file list, checksums and parity record
MARKER = ".recast-output"  # in every directory recast writes: what may be replaced
MARKER_FORMAT = "recast-output"
