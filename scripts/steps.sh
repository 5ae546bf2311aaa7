# Sourced by scripts/setup.sh and scripts/setup_agents.sh: one line per step with its time on the screen, the tools'
# own output (pip, apt-get, npm) in one log file, and a failed step's last lines with the log's path.
#   step "what it does" COMMAND ARGS...    run it (a shell function too, under set -e); on failure print the step's
#                                          last STEP_TAIL lines (default 20) and the log's path, and exit with its status
#   step_optional "what it does" COMMAND   the same, but a failure is reported as a warning and setup goes on
#   say "message"                          one line, no step (a thing already done, a thing skipped)
# The log is ARCLIGHT_SETUP_LOG (default .arclight/logs/setup.log, from the repository root): the first script that
# sources this file starts it afresh and exports its path, so a script it runs appends to the same file.

STEP_TAG=${STEP_TAG:-setup}
if [ -z "${ARCLIGHT_SETUP_LOG:-}" ] || [ -z "${ARCLIGHT_SETUP_LOG_STARTED:-}" ]; then
  export ARCLIGHT_SETUP_LOG=${ARCLIGHT_SETUP_LOG:-.arclight/logs/setup.log}
  export ARCLIGHT_SETUP_LOG_STARTED=1
  mkdir -p "$(dirname "$ARCLIGHT_SETUP_LOG")"
  printf '%s: %s in %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$0" "$PWD" > "$ARCLIGHT_SETUP_LOG"
fi

say() { printf '[%s] %s\n' "$STEP_TAG" "$*"; }

# 7 -> "7 s", 196 -> "3 min 16 s"
step_duration() { if [ "$1" -ge 60 ]; then printf '%d min %d s' $(($1 / 60)) $(($1 % 60)); else printf '%d s' "$1"; fi; }

_step() {
  local optional=$1 what=$2 start=$SECONDS rc from
  shift 2
  printf '[%s] %s ... ' "$STEP_TAG" "$what"
  printf '\n== %s  %s\n$ %s\n' "$(date -u '+%H:%M:%S')" "$what" "$*" >> "$ARCLIGHT_SETUP_LOG"
  from=$(($(wc -l < "$ARCLIGHT_SETUP_LOG") + 1))
  set +e
  ( set -e; "$@" ) >> "$ARCLIGHT_SETUP_LOG" 2>&1 < /dev/null
  rc=$?
  set -e
  if [ "$rc" -eq 0 ]; then
    printf '%s\n' "$(step_duration $((SECONDS - start)))"
    return 0
  fi
  printf 'failed after %s (exit status %d)\n' "$(step_duration $((SECONDS - start)))" "$rc"
  printf '== failed with exit status %d\n' "$rc" >> "$ARCLIGHT_SETUP_LOG"
  {
    printf '[%s] the last lines of its output:\n' "$STEP_TAG"
    tail -n "+$from" "$ARCLIGHT_SETUP_LOG" | grep -v '^== failed with exit status' | tail -n "${STEP_TAIL:-20}" | sed 's/^/    /'
    printf '[%s] all of it: %s\n' "$STEP_TAG" "$(realpath "$ARCLIGHT_SETUP_LOG" 2>/dev/null || echo "$ARCLIGHT_SETUP_LOG")"
  } >&2
  if [ "$optional" = 1 ]; then
    say "going on without it"
    return 0
  fi
  exit "$rc"
}

step() { _step 0 "$@"; }
step_optional() { _step 1 "$@"; }
