#!/bin/bash
# `gathering-lab load` against our server and the guide's FastAPI stack (benchmarks/peers/),
# at 100, 1,000 and 10,000 clients, idle then 100 ev/s, in one run (see BENCHMARKS.md, "Load
# tests"). One fresh server per (server, clients); both servers on 127.0.0.1:${PORT:-8765}.
# Output: benchmarks/results/load-<timestamp>/{all.txt, SERVER-N-RATE.{txt,err,parquet}}.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PORT=${PORT:-8765}
DURATION=${DURATION:-10}
OUT=benchmarks/results/load-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"  # 10,000 clients need 10,000+ descriptors on each side
echo "git $(git rev-parse --short HEAD), $(nproc) CPUs, ulimit -n $(ulimit -n)" | tee "$OUT/all.txt"
for n in 100 1000 10000; do
  for server in lab fastapi; do
    if [ "$server" = lab ]; then
      # Admission limits off: 10,000 loopback clients are one address, as a load test is.
      $PY -m gathering_lab serve --port "$PORT" --max-connections-per-ip 0 --publish-rate 0 \
        --log-level warning > "$OUT/srv-$server-$n.log" 2>&1 &
    else
      $PY benchmarks/peers/fastapi_manager.py --host 127.0.0.1 --port "$PORT" \
        > "$OUT/srv-$server-$n.log" 2>&1 &
    fi
    spid=$!
    for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done
    for rate in 0 100; do
      echo "=== $server clients=$n rate=$rate $(date +%T) loadavg $(cut -d' ' -f1-3 /proc/loadavg)" \
        | tee -a "$OUT/all.txt"
      timeout 600 $PY -m gathering_lab load --url "ws://127.0.0.1:$PORT/ws/dashboard" \
        --clients "$n" --rate "$rate" --duration "$DURATION" --out "$OUT/$server-$n-$rate.parquet" \
        > "$OUT/$server-$n-$rate.txt" 2> "$OUT/$server-$n-$rate.err"
      echo "exit $?" >> "$OUT/$server-$n-$rate.txt"
      tee -a "$OUT/all.txt" < "$OUT/$server-$n-$rate.txt"
    done
    kill "$spid"; wait "$spid" 2>/dev/null
  done
done
echo "done: $OUT"
