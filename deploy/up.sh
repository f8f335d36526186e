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

echo "==> image catalogue"
images=/var/lib/betang/images
mkdir -p "$images" /var/lib/betang/vms /var/lib/betang/controller /etc/betang /var/log/betang /run/betang
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
description = "Betang's offline test guest: boots, reads its cloud-init seed, prints its hostname on the serial console"
TOML
fi

echo "==> configuration in /etc/betang"
if [ ! -f /etc/betang/controller.toml ]; then
  cp "$here/controller.example.toml" /etc/betang/controller.toml
fi
if [ ! -f /etc/betang/agent.toml ]; then
  host_id=$(hostname -s | tr 'A-Z' 'a-z' | tr -c 'a-z0-9-\n' '-' | sed 's/^-*//' | cut -c1-63)
  sed "s/^host_id = .*/host_id = \"${host_id:-host-1}\"/" "$here/agent.example.toml" >/etc/betang/agent.toml
fi

start_service() {
  local name=$1 bin=$2 conf=$3
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    install -m 0644 "$here/systemd/$name.service" "/etc/systemd/system/$name.service"
    systemctl daemon-reload
    systemctl enable "$name.service" >/dev/null 2>&1 || true
    systemctl restart "$name.service"
    return
  fi
  local pidfile=/run/betang/$name.pid
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")"
    for _ in $(seq 1 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
  fi
  setsid "$bin" --config "$conf" >>"/var/log/betang/$name.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
}

echo "==> starting the controller and the agent"
start_service betang-controller /usr/local/bin/betang-controller /etc/betang/controller.toml
start_service betang-agent /usr/local/bin/betang-agent /etc/betang/agent.toml

endpoint=http://$(sed -n 's/^listen = "\(.*\)"/\1/p' /etc/betang/controller.toml)
for _ in $(seq 1 120); do
  if BETANG_ENDPOINT=$endpoint betangctl host list 2>/dev/null | grep -q '^state: *UP'; then
    break
  fi
  sleep 0.5
done
if ! BETANG_ENDPOINT=$endpoint betangctl host list 2>/dev/null | grep -q '^state: *UP'; then
  echo "the agent did not register; see /var/log/betang/ (or journalctl -u betang-agent)" >&2
  exit 1
fi
BETANG_ENDPOINT=$endpoint betangctl host list

cat <<MSG

Betang is up: controller on $endpoint, agent registered, image betang-test in the catalogue.
Request a VPS that really boots:

  betangctl vps create --name halo --vcpus 1 --memory-mib 128 --disk-gib 1 --image betang-test --wait

Then: betangctl vps list | get ID | stop ID | start ID | reboot ID | delete ID
The guest's serial console: /var/lib/betang/vms/<VPS id>/console.log
MSG
