#!/usr/bin/env bash
# A two-node cluster on one machine: an embedded server, two queue nodes, a batch of jobs spread over both.
# Whatever happens (an error, Ctrl-C), everything it started is stopped: the nodes first, then the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PORT="${PORT:-27117}"
export TASKSCHEDULER_MONGODB_URI="mongodb://127.0.0.1:${PORT}/?directConnection=true"
export TASKSCHEDULER_DATABASE="${TASKSCHEDULER_DATABASE:-two_nodes}"
nodes=()
server=""
cleanup() {
    trap - EXIT INT TERM
    for pid in "${nodes[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${nodes[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "$server" ]; then kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A server already on the port would answer in its place: refuse it rather than use it without a word.
if ! "$PYTHON" -c "import socket, sys; socket.socket().bind(('127.0.0.1', int(sys.argv[1])))" "$PORT" 2>/dev/null; then
    echo "port $PORT is in use: run with another, e.g. PORT=27118 bash examples/two_nodes.sh" >&2
    exit 1
fi
"$PYTHON" -m taskscheduler server --port "$PORT" --data-dir :memory: & server=$!
for _ in $(seq 1 150); do  # until it answers (at most 30 s)
    if "$PYTHON" -m taskscheduler jobs --limit 1 >/dev/null 2>&1; then break; fi
    kill -0 "$server" 2>/dev/null || { echo "the server did not start" >&2; exit 1; }
    sleep 0.2
done
"$PYTHON" -m taskscheduler queue --import examples.waiting --max-children 2 & nodes+=($!)
"$PYTHON" -m taskscheduler queue --import examples.waiting --max-children 2 & nodes+=($!)
"$PYTHON" -m examples.waiting
