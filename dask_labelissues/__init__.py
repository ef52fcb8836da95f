"""dask_labelissues: find mislabeled examples in classification data of any size.

Batched confident learning (as cleanlab's ``find_label_issues_batched``) on
Dask, a fork pool or a serial loop, with exact thresholds and output that
does not depend on chunking, engine or worker count.
"""

from .api import LabelIssues, find_label_issues
from .compat import LabelInspector, find_label_issues_batched
from .results import open_results

__version__ = "0.1.0"

__all__ = [
    "LabelInspector",
    "LabelIssues",
    "__version__",
    "find_label_issues",
    "find_label_issues_batched",
    "open_results",
]
