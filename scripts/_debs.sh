# Sourced by scripts/test: the Debian packages the tests run for real (contract: "test
# against that program"). Postfix, unbound and redis-server come from apt. Exim conflicts
# with Postfix as a package (both are the mail-transport-agent), so its daemon is unpacked
# privately with dpkg-deb -x into .deps/exim and run from there; its libraries come from
# apt, which does not conflict.
DEBS=(postfix unbound redis-server libidn12 libgnutls-dane0 systemd)
EXIM_DIR="$ROOT/.deps/exim"

ensure_debs() {
    local missing=() pkg
    for pkg in "${DEBS[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ] || [ ! -x "$EXIM_DIR/usr/sbin/exim4" ]; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
            echo "scripts/test: need root and apt-get to install: ${missing[*]} exim4-daemon-light" >&2
            return 1
        fi
        apt-get update -qq >/dev/null
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        # Postfix asks debconf questions; "No configuration" leaves it unconfigured and
        # stopped: the tests write their own main.cf and start it themselves.
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    if [ ! -x "$EXIM_DIR/usr/sbin/exim4" ]; then
        local tmp
        tmp="$(mktemp -d)"
        (cd "$tmp" && apt-get download -qq exim4-daemon-light 2>/dev/null)
        mkdir -p "$EXIM_DIR"
        dpkg-deb -x "$tmp"/exim4-daemon-light_*.deb "$EXIM_DIR"
        rm -rf "$tmp"
    fi
    # The Exim binary runs as the user it was built for (exim4-base, not installed,
    # would create it).
    id Debian-exim >/dev/null 2>&1 || useradd --system --no-create-home \
        --home-dir /var/spool/exim4 --shell /usr/sbin/nologin Debian-exim
    # Services the packages may have started are not ours: the tests start their own.
    for svc in postfix unbound redis-server; do
        service "$svc" stop >/dev/null 2>&1 || true
    done
}
