"""slidepipe: microscope slides to an aligned, multi-resolution volume with provenance."""

__version__ = "0.1.0"
