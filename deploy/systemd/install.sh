#!/usr/bin/env bash
# Install tmrl as systemd services on this Linux machine (run as root, from the repository root).
#   sudo bash deploy/systemd/install.sh [relay] [trainer] [worker:ID ...]
# With no arguments, installs the relay and the trainer units. Nothing is started until you enable it:
#   systemctl enable --now tmrl-relay tmrl-trainer tmrl-worker@worker-1
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo)" >&2; exit 1; }
repo=$(cd "$(dirname "$0")/../.." && pwd)
prefix=/opt/tmrl
units=("$@"); [ ${#units[@]} -gt 0 ] || units=(relay trainer)

id tmrl >/dev/null 2>&1 || useradd --system --home-dir /var/lib/tmrl --shell /usr/sbin/nologin tmrl
install -d -o root -g root -m 0755 "$prefix"
# Copy the sources (no venv, no caches), then build the venv in place: torch==2.13.0 first, as `make install` does.
tar -C "$repo" --exclude=.venv --exclude=.git --exclude='__pycache__' -cf - . | tar -C "$prefix" -xf -
make -C "$prefix" install
install -d -o root -g tmrl -m 0750 /etc/tmrl /etc/tmrl/keys
[ -f /etc/tmrl/tmrl.toml ] || install -o root -g tmrl -m 0640 "$repo/deploy/tmrl.example.toml" /etc/tmrl/tmrl.toml
[ -f /etc/tmrl/tmrl.env ] || install -o root -g tmrl -m 0640 /dev/null /etc/tmrl/tmrl.env
install -d -o tmrl -g tmrl -m 0750 /var/lib/tmrl /var/lib/tmrl/trainer

for unit in "${units[@]}"; do
  case "$unit" in
    relay)   install -m 0644 "$repo/deploy/systemd/tmrl-relay.service" /etc/systemd/system/ ;;
    trainer) install -m 0644 "$repo/deploy/systemd/tmrl-trainer.service" /etc/systemd/system/ ;;
    worker:*)
      install -m 0644 "$repo/deploy/systemd/tmrl-worker@.service" /etc/systemd/system/
      install -d -o tmrl -g tmrl -m 0750 "/var/lib/tmrl/worker-${unit#worker:}" ;;
    *) echo "unknown unit '$unit' (relay, trainer, worker:ID)" >&2; exit 2 ;;
  esac
done
systemctl daemon-reload
echo "installed: ${units[*]}. Keys: see docs/security.md; config: /etc/tmrl/tmrl.toml; then: systemctl enable --now <unit>"
