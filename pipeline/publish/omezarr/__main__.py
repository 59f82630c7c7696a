"""`python -m pipeline.publish.omezarr TIFF_DIR OUT.ome.zarr [options]`."""

import sys

from pipeline.publish.omezarr.cli import main

sys.exit(main())
