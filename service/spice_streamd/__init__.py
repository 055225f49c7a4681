"""spice-streamd: the root service that owns the SPICE stream device and runs one worker for the active session."""
