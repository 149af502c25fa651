#!/bin/bash
# The README's two commands:
#   ./tools/quickstart.sh        install, make the CA and certificates (first run only),
#                                start everything over TLS, vote on the sample series
#   ./tools/quickstart.sh test   install, then run the whole test suite (what CI runs)
#   ./tools/quickstart.sh stop   stop every daemon the first command started
# Safe to run again: every step reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=$REPO/.venv
MODE=${1:-run}

say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        say "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        apt_updated=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
            apt_install python3-venv python3-pip
        fi
        say "Creating the virtualenv $VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip
    fi
    "$VENV/bin/pip" show -q bindep >/dev/null 2>&1 || "$VENV/bin/pip" install -q bindep
}

ensure_system_packages() {
    local missing
    # shellcheck disable=SC2086
    missing=$("$VENV/bin/bindep" -b -f bindep.txt $1 || true)
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086
        apt_install $missing
    else
        say "System packages from bindep.txt: all present."
    fi
}

ensure_python_packages() {
    local extra=$1 stamp="$VENV/.installed$1"
    local want
    want=$(sha1sum setup.cfg pyproject.toml | sha1sum | cut -c1-40)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "Installing zuul-lite$extra into $VENV"
        "$VENV/bin/pip" install -q -e ".$extra"
        echo "$want" >"$stamp"
    else
        say "Python packages: up to date."
    fi
}

case "$MODE" in
    run)
        ensure_venv
        ensure_system_packages ""
        ensure_python_packages ""
        exec "$VENV/bin/zuul-lite" -c etc/zuul.yaml quickstart
        ;;
    test)
        ensure_venv
        ensure_system_packages test
        ensure_python_packages "[test]"
        say "ruff check"
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        say "pytest"
        # The 30 slowest tests close the output: what to look at first when
        # the suite nears its 30-minute budget.
        exec "$VENV/bin/pytest" -ra --durations=30 tests
        ;;
    stop)
        exec "$VENV/bin/zuul-lite" -c etc/zuul.yaml quickstart --stop
        ;;
    *)
        echo "usage: $0 [run|test|stop]" >&2
        exit 1
        ;;
esac
