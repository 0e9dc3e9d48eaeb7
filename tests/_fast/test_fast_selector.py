"""The ``shardon._fast`` selector: compiled classes by default, pure-Python twins as the fallback."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
from fast_impls import NOT_BUILT, ROOT, load_compiled

from shardon._fast import _balancer_py, _bucket_py, _queue_py

FORCED = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SHARDON_NO_EXTENSIONS"}
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        env=environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compiled_extensions_loaded() -> None:
    """Fails when the extensions are not built, unless SHARDON_NO_EXTENSIONS asks for the twins."""
    import shardon._fast as fast

    if FORCED:
        assert fast.USING_EXTENSIONS is False
        assert fast.FairQueue is _queue_py.FairQueue
        return
    compiled = load_compiled()
    assert compiled is not None, NOT_BUILT
    queue_c, bucket_c, balancer_c = compiled
    assert fast.USING_EXTENSIONS is True
    assert fast.FairQueue is queue_c.FairQueue
    assert fast.TokenBucket is bucket_c.TokenBucket
    assert fast.LeastConnBalancer is balancer_c.LeastConnBalancer


@pytest.mark.parametrize("value", ["1", "true", "yes", "TRUE", " Yes "])
def test_env_forces_python_twins_without_warning(value: str) -> None:
    result = run_python(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import shardon._fast as fast
            from shardon._fast import _balancer_py, _bucket_py, _queue_py
        assert not caught, [str(w.message) for w in caught]
        assert fast.USING_EXTENSIONS is False
        assert fast.FairQueue is _queue_py.FairQueue
        assert fast.TokenBucket is _bucket_py.TokenBucket
        assert fast.LeastConnBalancer is _balancer_py.LeastConnBalancer
        """,
        SHARDON_NO_EXTENSIONS=value,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("value", ["", "0", "no", "false"])
def test_env_other_values_do_not_force(value: str) -> None:
    if load_compiled() is None:
        pytest.skip(NOT_BUILT)
    result = run_python(
        """
        import shardon._fast as fast
        from shardon._fast import _queue_c
        assert fast.USING_EXTENSIONS is True
        assert fast.FairQueue is _queue_c.FairQueue
        """,
        SHARDON_NO_EXTENSIONS=value,
    )
    assert result.returncode == 0, result.stderr


def test_missing_extensions_fall_back_with_one_warning() -> None:
    result = run_python(
        """
        import sys, warnings
        sys.modules["shardon._fast._queue_c"] = None  # makes the import fail, as if not built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import shardon._fast as fast
            import shardon._fast as again
        from shardon._fast import _queue_py
        assert [w.category for w in caught] == [RuntimeWarning], caught
        assert str(caught[0].message) == (
            "shardon: compiled _fast extensions unavailable, using pure-Python twins"
        )
        assert fast.USING_EXTENSIONS is False
        assert fast.FairQueue is _queue_py.FairQueue
        """
    )
    assert result.returncode == 0, result.stderr


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")} | ({"__len__"} if hasattr(cls, "__len__") else set())


@pytest.mark.parametrize(
    ("py_cls", "c_module", "name"),
    [
        (_queue_py.FairQueue, 0, "FairQueue"),
        (_bucket_py.TokenBucket, 1, "TokenBucket"),
        (_balancer_py.LeastConnBalancer, 2, "LeastConnBalancer"),
    ],
)
def test_twins_have_the_same_api(py_cls: type, c_module: int, name: str) -> None:
    compiled = load_compiled()
    if compiled is None:
        pytest.skip(NOT_BUILT)
    c_cls = getattr(compiled[c_module], name)
    assert _public(c_cls) == _public(py_cls)
    for attr in _public(py_cls):
        py_attr = getattr(py_cls, attr)
        if isinstance(py_attr, property):
            assert isinstance(inspect.getattr_static(c_cls, attr), type(inspect.getattr_static(c_cls, attr)))
            continue
        c_sig = inspect.signature(getattr(c_cls, attr))
        py_sig = inspect.signature(py_attr)
        assert list(c_sig.parameters) == list(py_sig.parameters), attr
        assert [p.default for p in c_sig.parameters.values()] == [p.default for p in py_sig.parameters.values()]


def test_state_objects_do_not_pickle(impl: SimpleNamespace) -> None:
    import copy
    import pickle

    for obj in (impl.FairQueue(), impl.TokenBucket(1.0, 1.0, 0.0), impl.LeastConnBalancer()):
        with pytest.raises(TypeError):
            pickle.dumps(obj)
        with pytest.raises(TypeError):
            copy.copy(obj)
