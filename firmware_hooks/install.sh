#!/bin/sh
# Installs the board-level pieces into a root filesystem (the real / on a device, a scratch dir in tests).
# Idempotent: running it twice changes nothing the second time.
#   install.sh [--root DIR] [--dry-run]
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
ROOT=/ DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

put() { # put SRC DEST MODE
  if [ "$DRY" = 1 ]; then echo "would install $1 -> $ROOT$2 (mode $3)"; return; fi
  mkdir -p "$(dirname "$ROOT$2")"
  if [ -f "$ROOT$2" ] && cmp -s "$1" "$ROOT$2"; then return; fi
  cp "$1" "$ROOT$2.tmp" && chmod "$3" "$ROOT$2.tmp" && mv "$ROOT$2.tmp" "$ROOT$2"
  echo "installed $2"
}

put "$REPO/systemd/bwc-agent.service" /etc/systemd/system/bwc-agent.service 0644
put "$REPO/systemd/bwc-agent.tmpfiles.conf" /usr/lib/tmpfiles.d/bwc-agent.conf 0644
put "$REPO/systemd/bwc-agent.sysusers.conf" /usr/lib/sysusers.d/bwc-agent.conf 0644
put "$HERE/systemd/bwc-watchdog.conf" /etc/systemd/system.conf.d/bwc-watchdog.conf 0644
put "$HERE/udev/99-bwc-serial.rules" /etc/udev/rules.d/99-bwc-serial.rules 0644
put "$HERE/critical-battery-poweroff" /usr/lib/bwc-agent/critical-battery-poweroff 0755

# The boot fragment goes between markers in config.txt, replacing an older copy of itself.
CONFIG="$ROOT/boot/firmware/config.txt"
if [ "$DRY" = 1 ]; then
  echo "would merge $HERE/boot/config.txt.fragment into $CONFIG"
else
  mkdir -p "$(dirname "$CONFIG")"
  touch "$CONFIG"
  NEW=$(mktemp)
  sed '/^# >>> bwc-agent >>>$/,/^# <<< bwc-agent <<<$/d' "$CONFIG" > "$NEW"
  { echo "# >>> bwc-agent >>>"; cat "$HERE/boot/config.txt.fragment"; echo "# <<< bwc-agent <<<"; } >> "$NEW"
  if cmp -s "$NEW" "$CONFIG"; then rm -f "$NEW"; else mv "$NEW" "$CONFIG"; echo "updated /boot/firmware/config.txt"; fi
fi

# Let the agent's user power the board off (the critical-battery path) and nothing more.
RULE=/etc/polkit-1/rules.d/50-bwc-poweroff.rules
if [ "$DRY" = 1 ]; then echo "would install polkit rule $ROOT$RULE"; else
  mkdir -p "$(dirname "$ROOT$RULE")"
  TMP=$(mktemp)
  cat > "$TMP" <<'RULES'
polkit.addRule(function(action, subject) {
    if ((action.id == "org.freedesktop.login1.power-off" ||
         action.id == "org.freedesktop.login1.power-off-multiple-sessions" ||
         action.id == "org.freedesktop.login1.power-off-ignore-inhibit") && subject.user == "bwc") {
        return polkit.Result.YES;
    }
});
RULES
  if ! cmp -s "$TMP" "$ROOT$RULE" 2>/dev/null; then mv "$TMP" "$ROOT$RULE"; chmod 0644 "$ROOT$RULE"; echo "installed $RULE"; else rm -f "$TMP"; fi
fi
