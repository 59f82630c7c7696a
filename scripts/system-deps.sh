#!/usr/bin/env bash
# Installs the system programs slidepipe's tests and demo use (Debian/Ubuntu, as root):
#   apache2 (serving), chromium + chromium-driver (browser tests), mariadb-server (MySQL tests).
# Usage: scripts/system-deps.sh [apache|test]   (apache: only what `make demo` needs)
# Elsewhere it prints what to install and exits 0: the code itself never installs anything.
set -euo pipefail
want="${1:-test}"
pkgs=()
command -v apache2 >/dev/null 2>&1 || [ -x /usr/sbin/apache2 ] || pkgs+=(apache2)
if [ "$want" = test ]; then
  command -v chromium >/dev/null 2>&1 || pkgs+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || pkgs+=(chromium-driver)
  command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || pkgs+=(mariadb-server)
fi
if [ ${#pkgs[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${pkgs[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}"
else
  echo "NOTE: please install these system packages: ${pkgs[*]} (e.g. sudo apt-get install ${pkgs[*]})" >&2
fi
