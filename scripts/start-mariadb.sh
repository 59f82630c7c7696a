#!/usr/bin/env bash
# Makes sure a MariaDB server answers on 127.0.0.1:3306 (root, empty password) for the MySQL tests.
set -euo pipefail
ping() { mariadb-admin -uroot -h127.0.0.1 --connect-timeout=2 ping >/dev/null 2>&1 || mysqladmin -uroot -h127.0.0.1 --connect-timeout=2 ping >/dev/null 2>&1; }
if ping; then exit 0; fi
mariadbd_bin="$(command -v mariadbd || echo /usr/sbin/mariadbd)"
if [ ! -x "$mariadbd_bin" ]; then
  echo "mariadbd not installed" >&2; exit 1
fi
if [ ! -d /var/lib/mysql/mysql ]; then
  mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
fi
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
start-stop-daemon --start --oknodo --background --exec "$mariadbd_bin"
for _ in $(seq 1 60); do
  if ping; then exit 0; fi
  sleep 1
done
echo "MariaDB did not start on 127.0.0.1:3306" >&2
exit 1
