#!/usr/bin/env bash
# Stop and remove the tmrl systemd units. Keeps /etc/tmrl (keys, config) and /var/lib/tmrl (checkpoints) unless --purge.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo)" >&2; exit 1; }
for unit in $(systemctl list-units --all --plain --no-legend 'tmrl-*' | awk '{print $1}'); do
  systemctl disable --now "$unit" || true
done
rm -f /etc/systemd/system/tmrl-relay.service /etc/systemd/system/tmrl-trainer.service /etc/systemd/system/tmrl-worker@.service
# without a running systemd (a container) this fails: the files above are gone anyway, so go on and remove the rest
systemctl daemon-reload || echo "systemctl daemon-reload failed (is systemd running?); removing the files anyway" >&2
rm -rf /opt/tmrl
if [ "${1:-}" = "--purge" ]; then rm -rf /etc/tmrl /var/lib/tmrl; userdel tmrl 2>/dev/null || true; fi
echo "tmrl units removed"
