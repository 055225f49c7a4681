#!/bin/sh
# The client side of bob's session (xinit's client): a distinct picture, then the session helper
# exactly as the autostart entry would start it.
xsetroot -solid '#b0306a'
spice-stream-helper &
exec sleep infinity
