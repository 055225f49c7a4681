#!/bin/sh
# bob's X11 session on VT 3, run by the VM suite as a transient unit in a real PAM/logind session:
#   systemd-run --unit=vmtest-bob -p PAMName=login -p User=bob -p TTYPath=/dev/tty3 \
#     -p StandardInput=tty -p Environment=XDG_SESSION_TYPE=x11 ... /bin/sh bob-session.sh
# Xorg runs rootless (logind gives it the devices), with a fresh cookie in an Xauthority under
# /run/user, as a display manager would; the session paints a solid colour and starts the helper.
# As after a console login, X starts once this session is the active one (the suite runs chvt 3):
# logind hands an inactive session's X server paused DRM devices, and Xorg gives up.
set -eu
display=:5
auth="$XDG_RUNTIME_DIR/Xauthority"
cookie=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
rm -f "$auth"
xauth -q -f "$auth" add "$display" MIT-MAGIC-COOKIE-1 "$cookie"
export XAUTHORITY="$auth"
i=0
until [ "$(loginctl show-session "$XDG_SESSION_ID" -p Active --value)" = yes ]; do
  i=$((i + 1))
  [ $i -lt 600 ] || { echo "bob-session: session $XDG_SESSION_ID never became active" >&2; exit 1; }
  sleep 0.1
done
exec xinit /bin/sh "$(dirname "$0")/bob-client.sh" -- /usr/bin/Xorg "$display" vt3 -keeptty \
  -auth "$auth" -nolisten tcp -noreset
