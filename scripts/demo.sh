#!/usr/bin/env bash
# The demo after the sample brain exists: every built stage on the embedded defaults
# (SQLite in <data_root>/slidepipe.db, files under <data_root>/<animal>/), then where things are.
set -euo pipefail
PY="$1"; ANIMAL="$2"; DATA_ROOT="$3"
run() { echo "+ create_pipeline --animal $ANIMAL $*"; "$PY" -m pipeline --animal "$ANIMAL" --data-root "$DATA_ROOT" "$@"; }
run --task all --downsample true
run --task all --downsample false
run --task status
"$PY" - "$DATA_ROOT" "$ANIMAL" <<'PYEOF'
import sys
from pathlib import Path
root, animal = Path(sys.argv[1]).absolute(), sys.argv[2]
print()
print(f"outputs:  {root / animal}")
for sub in ("preps/tif", "preps/thumbnail_original", "www/scene", "www/neuroglancer_data", "www/omezarr"):
    p = root / animal / sub
    if p.exists():
        n = sum(1 for _ in p.iterdir())
        print(f"  {sub:<28} {n} entries")
print(f"database: sqlite:///{root / 'slidepipe.db'}  (e.g. sqlite3 {root / 'slidepipe.db'} 'select * from pipeline_run')")
PYEOF
echo
echo "+ create_pipeline serve --background --animal $ANIMAL"
"$PY" -m pipeline serve --background --animal "$ANIMAL" --data-root "$DATA_ROOT"
