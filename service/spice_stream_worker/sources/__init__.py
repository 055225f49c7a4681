"""The capture sources, side by side: `x11` (an X display through python-xlib; `xshm` and
`xauth` are its parts) and `screencast` (a GNOME on Wayland session through mutter's ScreenCast
and PipeWire). Each gives the interface of `..source`."""
