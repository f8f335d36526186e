#!/usr/bin/env bash
# Brings up a single-host Betang on this machine: packages, libvirtd, the
# controller with its SQLite store, one agent, and the test image in the
# catalogue. Safe to run again: it rebuilds what changed and restarts the
# controller and the agent (guests keep running; the agent adopts them).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=lib/deps.sh
. "$here/lib/deps.sh"
# shellcheck source=lib/libvirtd.sh
. "$here/lib/libvirtd.sh"

require_root
ensure_packages "${BETANG_PACKAGES[@]}"
ensure_rust
ensure_libvirtd

echo "==> building (release)"
(cd "$repo" && cargo build --release --locked -p betang-controller -p betang-agent)
for bin in betang-controller betang-agent betangctl; do
  install -m 0755 "$repo/target/release/$bin" "/usr/local/bin/$bin"
done

echo "==> the controller's own user"
# The controller needs no privilege: it runs as betang and owns only its
# store. The agent stays root (libvirt's system connection and the guests'
# disks), cut down by its unit.
if ! id -u betang >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /var/lib/betang/controller --no-create-home \
    --shell /usr/sbin/nologin betang
fi
mkdir -p /var/lib/betang/controller
# A store written while the controller ran as root is handed over.
chown -R betang:betang /var/lib/betang/controller
chmod 0700 /var/lib/betang/controller

echo "==> image catalogue"
images=/var/lib/betang/images
mkdir -p "$images" /var/lib/betang/vms /etc/betang /var/log/betang /run/betang
chmod 0755 /var/lib/betang "$images" /var/lib/betang/vms
built=$("$here/build-test-image.sh")
if ! cmp -s "$built" "$images/betang-test.qcow2"; then
  cp "$built" "$images/.betang-test.qcow2.partial"
  mv "$images/.betang-test.qcow2.partial" "$images/betang-test.qcow2"
fi
if ! grep -qs '^name = "betang-test"' "$images/catalog.toml"; then
  cat >>"$images/catalog.toml" <<'TOML'

[[image]]
name = "betang-test"
file = "betang-test.qcow2"
os = "busybox"
min_memory_mib = 128
description = "Betang's offline test guest: boots, reads its cloud-init seed, prints its hostname on the serial console"
TOML
fi

echo "==> configuration and certificates in /etc/betang"
host_id=$(hostname -s | tr 'A-Z' 'a-z' | tr -c 'a-z0-9-\n' '-' | sed 's/^-*//' | cut -c1-63)
host_id=${host_id:-host-1}
if [ ! -f /etc/betang/controller.toml ]; then
  cp "$here/controller.example.toml" /etc/betang/controller.toml
fi
# A configuration from before the portal gets it, among the top-level keys.
if ! grep -q '^portal_listen' /etc/betang/controller.toml; then
  sed -i '/^listen = /a portal_listen = "127.0.0.1:8480"\nportal_url = "http://127.0.0.1:8480"' \
    /etc/betang/controller.toml
fi
if [ ! -f /etc/betang/agent.toml ]; then
  sed -e "s/^host_id = .*/host_id = \"$host_id\"/" \
    -e "s#/etc/betang/pki/host-1#/etc/betang/pki/$host_id#" \
    "$here/agent.example.toml" >/etc/betang/agent.toml
fi
host_id=$(sed -n 's/^host_id = "\(.*\)"/\1/p' /etc/betang/agent.toml)
# Mutual TLS between controller and agent: the CA, then one certificate each.
# `betangctl pki issue` renews a certificate when run again.
pki=/etc/betang/pki
betangctl pki init --dir "$pki" >/dev/null
[ -f "$pki/betang-controller.pem" ] || betangctl pki issue betang-controller --dir "$pki" --san 127.0.0.1 >/dev/null
[ -f "$pki/$host_id.pem" ] || betangctl pki issue "$host_id" --dir "$pki" --san 127.0.0.1 >/dev/null
# The controller reads its configuration and its key through its group; the
# CA's key and the agent's stay root's alone.
chgrp betang /etc/betang/controller.toml "$pki/betang-controller-key.pem"
chmod 0640 /etc/betang/controller.toml "$pki/betang-controller-key.pem"
as_betang=(setpriv --reuid=betang --regid=betang --init-groups --bounding-set=-all)

start_service() {
  local name=$1 bin=$2 conf=$3
  shift 3
  # The rest: what runs the binary as its user when systemd does not.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    install -m 0644 "$here/systemd/$name.service" "/etc/systemd/system/$name.service"
    systemctl daemon-reload
    systemctl enable "$name.service" >/dev/null 2>&1 || true
    systemctl restart "$name.service"
    return
  fi
  local pidfile=/run/betang/$name.pid
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    # SIGTERM: it finishes the calls under way (at most 30 s) and exits.
    kill "$(cat "$pidfile")"
    for _ in $(seq 1 400); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
  fi
  setsid "$@" "$bin" --config "$conf" >>"/var/log/betang/$name.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
}

echo "==> starting the controller and the agent"
start_service betang-controller /usr/local/bin/betang-controller /etc/betang/controller.toml "${as_betang[@]}"
start_service betang-agent /usr/local/bin/betang-agent /etc/betang/agent.toml

endpoint=http://$(sed -n 's/^listen = "\(.*\)"/\1/p' /etc/betang/controller.toml)
for _ in $(seq 1 100); do
  # Any answer, even "not authenticated", means the controller is up.
  out=$(betangctl --endpoint "$endpoint" image list 2>&1 || true)
  grep -q 'cannot reach' <<<"$out" || break
  sleep 0.2
done

# The first admin, once: its token goes into root's betangctl config.
if ! betangctl whoami >/dev/null 2>&1; then
  echo "==> bootstrapping the first admin"
  token=$("${as_betang[@]}" betang-controller --config /etc/betang/controller.toml bootstrap-admin 2>/dev/null)
  echo "$token" | betangctl login --endpoint "$endpoint" --token-stdin >/dev/null
fi
institution=$(betangctl whoami | sed -n 's/^institution: *//p')
# The operators' own institution gets a small quota for trying things out.
# (Output is captured first: with pipefail, grep -q closing the pipe early
# would count as a failure.)
out=$(betangctl institution get "$institution")
if grep -q '/0 vCPU' <<<"$out"; then
  betangctl institution quota "$institution" --vcpus 8 --memory-mib 8192 --disk-gib 100 --vps 10 >/dev/null
fi

host_up() {
  local out
  out=$(betangctl host list 2>/dev/null || true)
  grep -q '^state: *UP' <<<"$out"
}
for _ in $(seq 1 120); do
  host_up && break
  sleep 0.5
done
if ! host_up; then
  echo "the agent did not register; see /var/log/betang/ (or journalctl -u betang-agent)" >&2
  exit 1
fi
betangctl host list

cat <<MSG

Betang is up: controller on $endpoint (agents on mutual TLS), agent $host_id registered,
image betang-test in the catalogue, and root's betangctl logged in as the first admin
(~/.config/betang/config.toml). Request a VPS that really boots:

  betangctl vps create --institution $institution --name halo --vcpus 1 --memory-mib 128 \\
      --disk-gib 1 --image betang-test --app-name "Halo" --responsible-name "Operator" --wait

Then: betangctl vps list | get ID | stop ID | start ID | reboot ID | delete ID
Institutions request through members' tokens and wait for approval:
  betangctl institution create --code dinkes --name "Dinas Kesehatan" --vcpus 16 --memory-mib 32768 --disk-gib 500 --vps 10
  betangctl user create --username siti --institution dinkes --role member
  betangctl token create --user USER_ID
  betangctl vps list --pending; betangctl vps approve ID; betangctl audit list
The guest's serial console: betangctl vps console ID (Ctrl-] leaves)
The portal (Bahasa Indonesia; English on a switch): $(sed -n 's/^portal_url = "\(.*\)"/\1/p' /etc/betang/controller.toml)
  betangctl user invite admin      # a one-time link to set a portal password
Metrics for Prometheus (see deploy/prometheus/): the agent's and the controller's
metrics_listen in /etc/betang/*.toml, e.g. curl http://127.0.0.1:9478/metrics
Usage: betangctl vps get ID --history 60; betangctl report usage --from YYYY-MM-DD --to YYYY-MM-DD
MSG
