import sys

from pipeline.create_pipeline import main

sys.exit(main())
