# Sourced by ab_steps.sh and ncu_ab.sh: the binaries they compare, from their arguments
# "A B [C ...] [ROUNDS] -- REST...".
# parse_binaries DEFAULT_ROUNDS USAGE ARGS...: sets BINS (as given), RUN (runnable paths: a .xz
# binary is unpacked under /tmp), SIDES (A, B, ... for BINS' positions), ROUNDS and REST (the
# arguments after --). Fewer than two binaries: prints "usage: USAGE" and exits 2. Each call
# unpacks into its own directory, so a run killed by a timeout (its ncu child may live on,
# holding its binary open) never leaves the next call's unpacking "Text file busy".
parse_binaries() {
    ROUNDS=$1
    local usage=$2 i
    shift 2
    BINS=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        case "$1" in
        *[!0-9]* | "") BINS+=("$1") ;;
        *) ROUNDS=$1 ;;
        esac
        shift
    done
    [ "${1:-}" = "--" ] && shift
    REST=("$@")
    if [ ${#BINS[@]} -lt 2 ]; then
        echo "usage: $usage" >&2
        exit 2
    fi
    SIDES=(A B C D E F G H)
    [ ${#BINS[@]} -le ${#SIDES[@]} ] || { echo "at most ${#SIDES[@]} binaries" >&2; exit 2; }
    RUN=()
    local dir
    dir=$(mktemp -d /tmp/binaries.XXXXXX) || exit 1
    for i in "${!BINS[@]}"; do
        case "${BINS[i]}" in
        *.xz)
            RUN[i]="$dir/$i-$(basename "${BINS[i]%.xz}")"
            xz -dc "${BINS[i]}" > "${RUN[i]}" && chmod +x "${RUN[i]}" || exit 1
            ;;
        *) RUN[i]=${BINS[i]} ;;
        esac
    done
}
