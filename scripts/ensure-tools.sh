#!/usr/bin/env bash
# Debian's tools that the tests run: promtool (package prometheus) checks the alert rules
# and a live scrape of /metrics (docs/monitoring.md); spamassassin scores our mail
# (docs/deliverability.md). A no-op when both are present; otherwise one `apt-get update`
# and an install of what is missing.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v spamassassin >/dev/null 2>&1 || missing+=(spamassassin)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "error: missing ${missing[*]} for the tests; install Debian's packages (apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing Debian's ${missing[*]} for the tests"
export DEBIAN_FRONTEND=noninteractive

# Only the command-line tools are wanted: the prometheus package would also start (and,
# under systemd, enable) a Prometheus server. Keep services from starting while we
# install, unless the machine already has its own policy.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
  systemctl disable --now --quiet prometheus 2>/dev/null || true
fi
command -v promtool >/dev/null && command -v spamassassin >/dev/null
