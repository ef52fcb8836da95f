"""``python -m dask_labelissues`` runs the command line."""

from .cli import run

run()
