#!/usr/bin/env bash
# Start JupyterLab for hevisum with a token, bound to the loopback interface unless told otherwise.
# Used by `make lab` and by the Docker image, so both start the server the same way.
#
# Usage: scripts/lab.sh [--ip IP] [--port PORT] [--token TOKEN] [--root DIR] [--dry-run] [-- JUPYTER ARGS...]
#
# Settings, first found wins: command-line option, then environment variable, then default.
#   --ip     LAB_IP      127.0.0.1   address to listen on; anything but loopback prints a warning
#   --port   LAB_PORT    8888        TCP port; the server fails instead of silently moving to another port
#   --token  LAB_TOKEN, then JUPYTER_TOKEN
#                        (generated) empty or unset: a random token is generated and printed with the URL;
#                                    an explicitly empty --token is refused
#   --root   LAB_ROOT    repository  folder shown in JupyterLab
#   LAB_PYTHON           the Python that has JupyterLab (default: the repository's .venv, else python3)
#   --dry-run            print the URL and the command, start nothing
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="scripts/lab.sh"

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

IP="${LAB_IP:-127.0.0.1}"
PORT="${LAB_PORT:-8888}"
TOKEN="${LAB_TOKEN:-${JUPYTER_TOKEN:-}}"
ROOT="${LAB_ROOT:-$REPO}"
DRY_RUN=0
TOKEN_GIVEN_EMPTY=0
EXTRA=()

need_value() {
  # $1 option name, $2 number of remaining arguments (including the option itself)
  [ "$2" -ge 2 ] || die "option $1 needs a value"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --ip) need_value "$1" $#; IP="$2"; shift 2 ;;
    --ip=*) IP="${1#*=}"; shift ;;
    --port) need_value "$1" $#; PORT="$2"; shift 2 ;;
    --port=*) PORT="${1#*=}"; shift ;;
    --token) need_value "$1" $#; TOKEN="$2"; [ -n "$2" ] || TOKEN_GIVEN_EMPTY=1; shift 2 ;;
    --token=*) TOKEN="${1#*=}"; [ -n "$TOKEN" ] || TOKEN_GIVEN_EMPTY=1; shift ;;
    --root) need_value "$1" $#; ROOT="$2"; shift 2 ;;
    --root=*) ROOT="${1#*=}"; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option '$1' (valid: --ip, --port, --token, --root, --dry-run, -- JUPYTER ARGS)" ;;
  esac
done

# A server without a token lets anyone who can reach the port run code as this user: never start one.
if [ "$TOKEN_GIVEN_EMPTY" -eq 1 ]; then
  die "empty token refused: a JupyterLab without a token runs code for anyone who reaches the port. \
Leave the token out to get a random one, or set one: --token \"\$(python3 -c 'import secrets; print(secrets.token_hex(24))')\", \
LAB_TOKEN=... (make lab LAB_TOKEN=...) or JUPYTER_TOKEN=... (docker run -e JUPYTER_TOKEN=...)"
fi
# The token travels to Jupyter only through JUPYTER_TOKEN (see below), so extra arguments may not replace it.
for arg in ${EXTRA[@]+"${EXTRA[@]}"}; do
  case "$arg" in
    *[Tt]oken*|*[Pp]assword*) die "'$arg' not allowed after --: set the token with --token, LAB_TOKEN or JUPYTER_TOKEN" ;;
  esac
done

[ -n "$IP" ] || die "empty --ip/LAB_IP: use 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces, e.g. in a container)"
case "$PORT" in
  ''|*[!0-9]*) die "port must be a number in 1..65535, got '$PORT'" ;;
esac
[ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "port must be a number in 1..65535, got '$PORT'"
[ -d "$ROOT" ] || die "root folder '$ROOT' does not exist (set --root or LAB_ROOT to an existing folder)"
ROOT="$(cd "$ROOT" && pwd)"

if [ -n "${LAB_PYTHON:-}" ]; then
  PY="$LAB_PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then
  PY="$REPO/.venv/bin/python"
else
  PY="python3"
fi
command -v "$PY" >/dev/null 2>&1 || die "Python '$PY' not found (set LAB_PYTHON, or run 'make init')"
# find_spec locates the package without importing it (an import costs seconds).
"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("jupyterlab") is None)' 2>/dev/null || die "JupyterLab is not installed for '$PY' (run 'make init', or pip install -e '.[lab]')"

TOKEN_SOURCE="given"
if [ -z "$TOKEN" ]; then
  TOKEN="$("$PY" -c 'import secrets; print(secrets.token_hex(24))')"
  TOKEN_SOURCE="generated"
fi
if [ "${#TOKEN}" -lt 16 ]; then
  echo "$PROG: warning: the token has only ${#TOKEN} characters; a guessable token protects little (leave it out to get a random one)" >&2
fi

is_loopback=0
case "$IP" in
  127.*|localhost|::1|\[::1\]|0:0:0:0:0:0:0:1) is_loopback=1 ;;
esac
if [ "$is_loopback" -eq 0 ]; then
  cat >&2 <<EOF
################################################################################
$PROG: WARNING: JupyterLab will listen on $IP, not only on this machine.
Anyone who can reach port $PORT on that address and learns the token can run
code as $(id -un 2>/dev/null || echo this user). Use 127.0.0.1 unless you need remote access.
In a container this is expected: publish the port on the host's loopback only,
  docker run -p 127.0.0.1:$PORT:$PORT -e LAB_IP=0.0.0.0 ...
################################################################################
EOF
elif [ -f /.dockerenv ] || [ -f /run/.containerenv ]; then
  echo "$PROG: note: inside a container, $IP is reachable only from inside the container; to open it from" \
       "the host run: docker run -p 127.0.0.1:$PORT:$PORT -e LAB_IP=0.0.0.0 ..." >&2
fi

case "$IP" in
  0.0.0.0) URL_HOST="127.0.0.1" ;;
  ::|\[::\]) URL_HOST="[::1]" ;;
  \[*) URL_HOST="$IP" ;;
  *:*) URL_HOST="[$IP]" ;;
  *) URL_HOST="$IP" ;;
esac
if [ "$TOKEN_SOURCE" = "generated" ]; then
  SHOWN_TOKEN="$TOKEN"
else
  SHOWN_TOKEN="<your token>"
fi

CMD=("$PY" -m jupyterlab --no-browser
     "--ServerApp.ip=$IP" "--ServerApp.port=$PORT" "--ServerApp.port_retries=0"
     "--ServerApp.root_dir=$ROOT")
CMD+=(${EXTRA[@]+"${EXTRA[@]}"})

echo "JupyterLab ($TOKEN_SOURCE token), folder $ROOT"
echo "    http://$URL_HOST:$PORT/lab?token=$SHOWN_TOKEN"
if [ "$DRY_RUN" -eq 1 ]; then
  echo "would run: JUPYTER_TOKEN=... ${CMD[*]}"
  exit 0
fi

# The token goes through the environment, not the command line: a process's arguments are visible to
# every local user (ps), its environment only to the same user.
export JUPYTER_TOKEN="$TOKEN"
unset JUPYTER_TOKEN_FILE
exec "${CMD[@]}"
