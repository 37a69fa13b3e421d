#!/usr/bin/env bash
# A two-node cluster on one machine: an embedded server, two queue nodes, a batch of jobs spread over both.
set -euo pipefail
cd "$(dirname "$0")/.."
export TASKSCHEDULER_MONGODB_URI="mongodb://127.0.0.1:27117/?directConnection=true"
taskscheduler server --port 27117 --data-dir :memory: & server=$!
sleep 3
taskscheduler queue --import examples.waiting --max-children 2 & node1=$!
taskscheduler queue --import examples.waiting --max-children 2 & node2=$!
trap 'kill $node1 $node2; wait $node1 $node2; kill $server' EXIT
python -m examples.waiting
