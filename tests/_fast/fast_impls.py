"""Both implementations of the ``shardon._fast`` primitives, for the tests (imported by conftest).

The compiled modules and the pure-Python twins are imported directly, not through the selector.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from types import ModuleType, SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if importlib.util.find_spec("shardon") is None:  # running from a checkout that isn't installed
    sys.path.insert(0, ROOT)

with warnings.catch_warnings():
    # The selector warns when the compiled modules are missing; that case is what
    # test_compiled_extensions_loaded reports, so importing the package here must not fail on it.
    warnings.simplefilter("ignore", RuntimeWarning)
    import shardon._fast  # noqa: F401

from shardon._fast import _balancer_py, _bucket_py, _queue_py  # noqa: E402

NOT_BUILT = "compiled shardon._fast extensions not built (run: python setup.py build_ext --inplace)"


def load_compiled() -> tuple[ModuleType, ModuleType, ModuleType] | None:
    try:
        return (
            importlib.import_module("shardon._fast._queue_c"),
            importlib.import_module("shardon._fast._bucket_c"),
            importlib.import_module("shardon._fast._balancer_c"),
        )
    except ImportError:
        return None


COMPILED = load_compiled()
PY = SimpleNamespace(
    name="py",
    FairQueue=_queue_py.FairQueue,
    TokenBucket=_bucket_py.TokenBucket,
    LeastConnBalancer=_balancer_py.LeastConnBalancer,
)
C = (
    None
    if COMPILED is None
    else SimpleNamespace(
        name="c",
        FairQueue=COMPILED[0].FairQueue,
        TokenBucket=COMPILED[1].TokenBucket,
        LeastConnBalancer=COMPILED[2].LeastConnBalancer,
    )
)
