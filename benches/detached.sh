#!/usr/bin/env bash
# A command longer than one GPU call (10 minutes at most), run across calls: `start` launches
# it in a new process session (setsid), which the device machine keeps running after the
# call returns, until the machine goes back (after ~30 s idle: make the calls back to back);
# `wait` waits for it up to SECONDS and prints its exit status (or "running") and the end of
# its log.
# Usage:
#   benches/detached.sh start LOG CMD...   e.g. the 8B QLoRA step at 524,288 tokens (538 s, 571 s with setup):
#     benches/detached.sh start /tmp/524k.log /tmp/ftrt bench --preset llama-3.1-8b \
#       --mode qlora --batch 1 --seq 524288 --keep-layers auto --offload-residuals \
#       --offload-embeddings --steps 1 --warmup 0
#   benches/detached.sh wait LOG SECONDS   (exit status 0 once it ended, 1 while it runs)
set -u
case "${1:-}" in
start)
    LOG=${2:?usage: detached.sh start LOG CMD...}
    shift 2
    [ $# -gt 0 ] || { echo "usage: detached.sh start LOG CMD..." >&2; exit 2; }
    rm -f "$LOG.rc"
    : > "$LOG"
    # shellcheck disable=SC2016 # expanded by the inner shell: $0 is LOG, $@ the command
    setsid bash -c '"$@" > "$0" 2>&1; echo $? > "$0.rc"' "$LOG" "$@" < /dev/null > /dev/null 2>&1 &
    echo "started: $* (log $LOG)"
    ;;
wait)
    LOG=${2:?usage: detached.sh wait LOG SECONDS}
    SECONDS_MAX=${3:?usage: detached.sh wait LOG SECONDS}
    [ -e "$LOG" ] || { echo "no log $LOG: start it first (on this machine)" >&2; exit 2; }
    end=$((SECONDS + SECONDS_MAX))
    while [ ! -e "$LOG.rc" ] && [ "$SECONDS" -lt "$end" ]; do sleep 2; done
    if [ -e "$LOG.rc" ]; then echo "ended: exit status $(cat "$LOG.rc")"; else echo "running"; fi
    tail -n 20 "$LOG"
    [ -e "$LOG.rc" ]
    ;;
*)
    echo "usage: detached.sh start LOG CMD... | wait LOG SECONDS" >&2
    exit 2
    ;;
esac
