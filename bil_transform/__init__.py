"""bil-transform: serve microscopy volumes, left in their original files, as multiscale OME-Zarr."""

__version__ = "0.1.0"
