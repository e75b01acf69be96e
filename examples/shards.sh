#!/usr/bin/env bash
# Split one inventory over two backup hosts with --shard K/N, played on this machine:
# four lab servers, two "backup hosts" (two concurrent `invoke backup` runs, one shard
# each), then the status of every host. Run from the repository after `./dev setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
INVOKE=.venv/bin/invoke
PREFIX=pullback-shards
INV=.state/$PREFIX/inventory.yaml
# The copies (four container roots) go too: this example shows the split, not a backup.
trap '$INVOKE lab.down --prefix $PREFIX >/dev/null; rm -rf .state/$PREFIX/backups' EXIT

$INVOKE lab.up --count 4 --prefix $PREFIX
$INVOKE keygen --inventory $INV
$INVOKE setup-remote --inventory $INV
for k in 1 2; do
  echo "== backup host $k of 2 pulls: $($INVOKE status --inventory $INV --shard $k/2 \
        2>/dev/null | awk 'NR > 1 {print $1}' | tr '\n' ' ')"
done
$INVOKE backup --inventory $INV --shard 1/2 > .state/$PREFIX/shard-1.log &
first=$!
$INVOKE backup --inventory $INV --shard 2/2 > .state/$PREFIX/shard-2.log
wait "$first"
cat .state/$PREFIX/shard-1.log .state/$PREFIX/shard-2.log
$INVOKE status --inventory $INV
