"""Scene representation for stage 1: cameras, hash-grid field, rendering."""
