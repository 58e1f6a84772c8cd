#!/usr/bin/env bash
# Installs the system packages the tests, the demo and the benchmark use,
# only where they are missing (Debian/Ubuntu, as root).
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip       || need+=(iproute2)
have ping     || need+=(iputils-ping)
have iperf3   || need+=(iperf3)
have nft      || need+=(nftables)
have tcpdump  || need+=(tcpdump)
have nc       || need+=(netcat-openbsd)
have python3  || need+=(python3)
have curl     || need+=(curl)
have dig      || need+=(bind9-dnsutils)   # s26_dns
# s22_metrics: promtool checks the /metrics scrapes; headless Chromium
# loads the registry's status page.
have promtool || need+=(prometheus)
have chromium || need+=(chromium)
have systemd-analyze || need+=(systemd)   # scripts/check-units.sh
# scripts/pg.sh (the storage suite) and s25_postgres: the server binaries.
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
# s27_port_mapping: a router granting NAT-PMP mappings (miniupnpd), which
# learns that its address is reachable from a STUN server answering
# CHANGE-REQUEST (stund). The scenario runs both in its own namespaces.
have miniupnpd || need+=(miniupnpd)
have stund     || need+=(stun-server)
for extra in "$@"; do
  case "$extra" in
    wireguard-go) have wireguard-go || need+=(wireguard-go) ;;
    wg)           have wg || need+=(wireguard-tools) ;;
    perf)         have perf || need+=(linux-perf) ;;
    *)            have "$extra" || need+=("$extra") ;;
  esac
done

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need[*]} (run as root, or install them: apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "installing: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Packages that ship a service (miniupnpd, stun-server) must not start it
  # on this host: the tests start what they need in their own namespaces.
  # policy-rc.d refuses every service start for the install (unless the
  # host already has a policy of its own).
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  trap '[ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
