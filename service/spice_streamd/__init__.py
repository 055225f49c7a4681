"""spice-streamd: the root service that owns the SPICE stream device and runs the active session's worker."""
