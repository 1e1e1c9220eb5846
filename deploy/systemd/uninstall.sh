#!/usr/bin/env bash
# Stop and remove the tmrl systemd units. Keeps /etc/tmrl (keys, config) and /var/lib/tmrl (checkpoints) unless --purge.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo)" >&2; exit 1; }
for unit in $(systemctl list-units --all --plain --no-legend 'tmrl-*' | awk '{print $1}'); do
  systemctl disable --now "$unit" || true
done
rm -f /etc/systemd/system/tmrl-relay.service /etc/systemd/system/tmrl-trainer.service /etc/systemd/system/tmrl-worker@.service
systemctl daemon-reload
rm -rf /opt/tmrl
if [ "${1:-}" = "--purge" ]; then rm -rf /etc/tmrl /var/lib/tmrl; userdel tmrl 2>/dev/null || true; fi
echo "tmrl units removed"
