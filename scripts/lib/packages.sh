# Installs the Debian packages named as arguments that are missing (pass "path:package" pairs:
# the package is installed when the path does not exist). Services are never started.
ensure_packages() {
  local missing=() pair
  for pair in "$@"; do
    [ -e "${pair%%:*}" ] || missing+=("${pair#*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # RUNLEVEL=1 keeps the packages from starting their own system-wide instances.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
}

# Installs Debian's PostgreSQL server when no version of it is there (tests and benchmarks run
# their own clusters as the postgres user; RUNLEVEL=1 keeps the system cluster from starting).
ensure_postgresql() {
  local initdb
  initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | head -n 1 || true)
  ensure_packages "${initdb:-/usr/lib/postgresql/none/bin/initdb}:postgresql"
}
