#!/bin/bash
# Before/after figures of two commits in one run, alternating so both meet the same load:
#   bench/before_after.sh OLD_COMMIT [ROUNDS]
# Each tree runs its own bench scripts against its own source (a git worktree for OLD_COMMIT
# under /tmp, this checkout for the new code). Prints the proxy, agg and 5,000-client bridge
# figures of docs/benchmarks.md ("The rebuild").
set -euo pipefail
OLD=${1:?usage: bench/before_after.sh OLD_COMMIT [ROUNDS]}
ROUNDS=${2:-3}
NEW=$(cd "$(dirname "$0")/.." && pwd)
PY=$NEW/.venv/bin/python
BEFORE=/tmp/polyfan-before-$OLD
[ -d "$BEFORE" ] || git -C "$NEW" worktree add -f "$BEFORE" "$OLD" >/dev/null
run() { # name tree args...
    local name=$1 tree=$2
    shift 2
    echo "=== $name $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd "$tree" && PYTHONPATH=$tree/src timeout 600 "$PY" "$@" 2>&1 | grep -v WARNING | tail -12)
}
# warm both trees' numba caches first
run warm-before "$BEFORE" bench/bench_proxy.py --trades 200000 --skip-zmq >/dev/null
run warm-after "$NEW" bench/bench_proxy.py --trades 200000 --skip-zmq >/dev/null
for _ in $(seq "$ROUNDS"); do
    run bridge-before "$BEFORE" bench/bench_bridge.py --clients 5000 --workers 2
    run bridge-after "$NEW" bench/bench_bridge.py --clients 5000 --workers 2
done
for _ in $(seq "$ROUNDS"); do
    run proxy-before "$BEFORE" bench/bench_proxy.py --trades 4000000 --skip-zmq
    run proxy-after "$NEW" bench/bench_proxy.py --trades 4000000 --skip-zmq
done
for _ in $(seq "$ROUNDS"); do
    run agg-before "$BEFORE" bench/bench_agg.py zmq
    run agg-after "$NEW" bench/bench_agg.py zmq
done
