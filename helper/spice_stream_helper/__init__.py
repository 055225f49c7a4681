"""spice-stream-helper: tells the service how to reach this graphical session's display."""
