"""spice-stream-worker: captures one X11 display and speaks the SPICE stream-device protocol on an fd."""
