#!/usr/bin/env bash
# `make bench`: install what the benchmarks need, then run every figure and write
# docs/benchmarks.md and docs/bench-rate.png. Extra arguments go to bench/harness.py
# (e.g. `bash bench/run.sh --only P1,P2,P3`).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v smtp-sink >/dev/null && command -v smtp-source >/dev/null || need_apt+=(postfix)
command -v wrk >/dev/null || need_apt+=(wrk)
if ((${#need_apt[@]})); then
  echo "bench: installing ${need_apt[*]} (Debian packages; the Postfix daemon is not started)"
  # Postfix's installer asks what kind of mail server this is: none, it only brings the
  # smtp-sink and smtp-source test programs, and no daemon is configured or run.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# py-spy profiles the processes that miss a target; a tool, not a project dependency.
[ -x .venv/bin/py-spy ] || .venv/bin/pip install -q py-spy

echo "bench: load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
exec .venv/bin/python bench/harness.py --profile full "$@"
