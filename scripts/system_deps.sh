#!/bin/sh
# System packages clmtune's pictures and report tests use (Debian/Ubuntu names):
#   fonts-noto-cjk  a CJK font, so Chinese labels in every PNG show as Chinese, not as boxes
#   chromium        headless browser that renders report.html in the tests (skipped where it is missing)
# Installs what is missing when it runs as root with apt-get; otherwise prints what is missing and carries on
# (clmtune still works: pictures warn about missing glyphs, the browser test is skipped). Never fails the build.
missing=""
if ! command -v fc-list >/dev/null 2>&1 || [ -z "$(fc-list :lang=zh family 2>/dev/null)" ]; then
    missing="$missing fonts-noto-cjk"
fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    missing="$missing chromium"
fi
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "system_deps: installing$missing"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 ||
       { apt-get update -q >/dev/null 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1; }; then
        exit 0
    fi
    echo "system_deps: could not install$missing (apt-get failed); continuing without them"
else
    echo "system_deps: missing$missing; install them (Debian: sudo apt-get install$missing) for Chinese in" \
         "pictures and the browser test of report.html; continuing without them"
fi
exit 0
