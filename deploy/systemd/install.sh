#!/usr/bin/env bash
# Install tmrl as systemd services on this Linux machine (run as root, from a checkout of the repository).
#   sudo bash deploy/systemd/install.sh [--dry-run] [relay] [trainer] [worker]
# With no arguments, installs the relay and the trainer units. Nothing is started until you enable it:
#   systemctl enable --now tmrl-relay tmrl-trainer tmrl-worker@worker-1
# Each machine gets only what its roles need: the relay alone installs no torch. Every machine gets tmrl-relay (no
# torch, no unit unless the relay role is asked for): its `keys generate` makes each host's own key pair.
# Environment: PYTHON (an interpreter >= 3.11, default python3), TORCH_SPEC (default torch==2.13.0),
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu128 for a CUDA build on the trainer).
set -euo pipefail
dry_run=no; roles=()
for arg in "$@"; do [ "$arg" = --dry-run ] && dry_run=yes || roles+=("$arg"); done
repo=$(cd "$(dirname "$0")/../.." && pwd)
prefix=/opt/tmrl
python=${PYTHON:-python3}
[ ${#roles[@]} -gt 0 ] || roles=(relay trainer)

packages=("$repo/libs/common" "$repo/services/relay")
units=()
needs_torch=no
for role in "${roles[@]}"; do
  case "$role" in
    relay)   units+=(tmrl-relay.service) ;;
    trainer) packages+=("$repo/services/trainer"); needs_torch=yes; units+=(tmrl-trainer.service) ;;
    worker|worker:*) packages+=("$repo/services/worker"); needs_torch=yes; units+=(tmrl-worker@.service) ;;
    *) echo "unknown role '$role' (relay, trainer, worker)" >&2; exit 2 ;;
  esac
done
# The interpreter, checked before the dry run's plan too (an operator probe's dry run said nothing of a pyenv python
# under /root that the real run refuses): the real run stops at the first problem, a dry run lists them all.
problems=()
real_python=""
if ! command -v "$python" >/dev/null; then
  problems+=("no $python: install Python >= 3.11 or set PYTHON=/path/to/python3.11")
elif ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  problems+=("$python is $("$python" -V 2>&1 || echo 'not a working Python'); tmrl needs >= 3.11: install python3.11 (or newer) and python3.11-venv, then run again with PYTHON=python3.11 (docs/deployment.md, Prerequisites)")
else
  "$python" -c 'import ensurepip, venv' 2>/dev/null || problems+=("$python cannot create virtual environments: install its venv package (Debian/Ubuntu: apt install python3-venv, or python3.11-venv for python3.11)")
  # The venv's python is a link to this interpreter, which the units run as tmrl with ProtectHome=true: one under
  # /root, /home or /run/user (pyenv, conda, uv) fails every unit with status 203/EXEC, so refuse it before installing.
  real_python=$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))' 2>/dev/null || true)
  case "$real_python" in
  "") problems+=("$python is not a working Python (it printed no path for its interpreter): set PYTHON=/path/to/python3.11") ;;
  /root/*|/home/*|/run/user/*)
    problems+=("$python is $real_python, in a home folder: the units (User=tmrl, ProtectHome=true) cannot run it. Install Python >= 3.11 system-wide (e.g. /usr/bin/python3.11) and run again with PYTHON=that path") ;;
  esac
fi
if [ "$dry_run" = yes ]; then  # what would be installed, for a look before the real run (and for the tests)
  echo "torch: $needs_torch"; printf 'package: %s\n' "${packages[@]#"$repo"/}"
  printf 'unit: /etc/systemd/system/%s\n' "${units[@]}"
  echo "venv: $prefix/.venv (with $python; a copy of docs/ and deploy/ in $prefix)"
  echo "user: tmrl (system user, home /var/lib/tmrl), made if missing"
  echo "config: /etc/tmrl/tmrl.toml and /etc/tmrl/tmrl.env (kept if present), keys folder /etc/tmrl/keys"
  for problem in ${problems[@]+"${problems[@]}"}; do echo "problem (the real run stops on it): $problem"; done
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "run as root (sudo)" >&2; exit 1; }
[ ${#problems[@]} -eq 0 ] || { echo "${problems[0]}" >&2; exit 1; }
id tmrl >/dev/null 2>&1 || useradd --system --home-dir /var/lib/tmrl --shell /usr/sbin/nologin tmrl
runuser -u tmrl -- "$real_python" -c pass 2>/dev/null || {
  echo "user tmrl cannot run $real_python: make it (and its standard library) readable and executable by other" >&2
  echo "users, or use another system-wide Python (PYTHON=...)" >&2; exit 1; }
install -d -o root -g root -m 0755 "$prefix"
# The docs and the deploy files only (the venv is built from the checkout): a fresh copy each time, so files deleted
# from the repository disappear here too; runs/, keys/, allow/ and the venv of the checkout are never copied.
rm -rf "$prefix/docs" "$prefix/deploy"
cp -r "$repo/docs" "$repo/deploy" "$prefix/"
[ -x "$prefix/.venv/bin/python" ] || "$python" -m venv "$prefix/.venv"
"$prefix/.venv/bin/python" -m pip install --quiet --upgrade pip
if [ "$needs_torch" = yes ]; then
  # torch first and alone: a looser spec pulled in by a package could fetch an unexpected build
  "$prefix/.venv/bin/python" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
# regular (not editable) installs: /opt/tmrl does not depend on the checkout afterwards; --force-reinstall of our
# packages only, so an update with the same version number is installed too
"$prefix/.venv/bin/python" -m pip install --quiet "${packages[@]}"
"$prefix/.venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "${packages[@]}"

install -d -o root -g tmrl -m 0750 /etc/tmrl /etc/tmrl/keys
[ -f /etc/tmrl/tmrl.toml ] || install -o root -g tmrl -m 0640 "$repo/deploy/tmrl.example.toml" /etc/tmrl/tmrl.toml
[ -f /etc/tmrl/tmrl.env ] || install -o root -g tmrl -m 0640 /dev/null /etc/tmrl/tmrl.env
install -d -o tmrl -g tmrl -m 0750 /var/lib/tmrl  # state directories below it are made by systemd (StateDirectory=)

installed=()
for role in "${roles[@]}"; do
  case "$role" in
    relay)   install -m 0644 "$repo/deploy/systemd/tmrl-relay.service" /etc/systemd/system/; installed+=(tmrl-relay) ;;
    trainer) install -m 0644 "$repo/deploy/systemd/tmrl-trainer.service" /etc/systemd/system/; installed+=(tmrl-trainer) ;;
    worker|worker:*) install -m 0644 "$repo/deploy/systemd/tmrl-worker@.service" /etc/systemd/system/
                     installed+=("tmrl-worker@<id>") ;;
  esac
done
systemctl daemon-reload
echo "installed: ${installed[*]}. Keys: docs/security.md; config: /etc/tmrl/tmrl.toml; then: systemctl enable --now <unit>"
