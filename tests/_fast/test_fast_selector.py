"""The ``shardon._fast`` selector: compiled classes by default, pure-Python twins as the fallback."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from shardon._fast import _balancer_py, _bucket_py, _queue_py, _rowwriter_py
from tests._fast.fast_impls import NOT_BUILT, ROOT, load_compiled, load_rowwriter

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
        assert fast.ROWWRITER_COMPILED is False
        assert fast.RowWriter is _rowwriter_py.RowWriter
        return
    compiled = load_compiled()
    assert compiled is not None, NOT_BUILT
    queue_c, bucket_c, balancer_c = compiled
    assert fast.USING_EXTENSIONS is True
    assert fast.FairQueue is queue_c.FairQueue
    assert fast.TokenBucket is bucket_c.TokenBucket
    assert fast.LeastConnBalancer is balancer_c.LeastConnBalancer
    rowwriter_c, why = load_rowwriter()
    assert rowwriter_c is not None, why
    assert fast.ROWWRITER_COMPILED is True
    assert fast.RowWriter is rowwriter_c.RowWriter


def _mapped_sqlite_libraries() -> set[str]:
    """Paths of every ``libsqlite3`` file mapped into this process."""
    with open("/proc/self/maps") as maps:
        fields = (line.split(None, 5) for line in maps)
        return {f[5].rstrip("\n") for f in fields if len(f) == 6 and "libsqlite3" in f[5]}


def test_compiled_rowwriter_uses_the_sqlite3_modules_library() -> None:
    """The compiled writer reaches SQLite through the library ``_sqlite3`` loaded: one copy in the process."""
    if FORCED:
        pytest.skip("SHARDON_NO_EXTENSIONS is set")
    import _sqlite3  # noqa: F401  (the sqlite3 module's C part, linked to the library)

    rowwriter_c, why = load_rowwriter()
    assert rowwriter_c is not None, why
    libraries = _mapped_sqlite_libraries()
    assert len(libraries) == 1, f"expected one SQLite library mapped, found {sorted(libraries)}"
    (library,) = libraries
    assert library == rowwriter_c.SQLITE_LIBRARY
    assert os.path.samefile(rowwriter_c.SQLITE_LIBRARY, library)


@pytest.mark.parametrize("value", ["1", "true", "yes", "TRUE", " Yes "])
def test_env_forces_python_twins_without_warning(value: str) -> None:
    result = run_python(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import shardon._fast as fast
            from shardon._fast import _balancer_py, _bucket_py, _queue_py, _rowwriter_py
        assert not caught, [str(w.message) for w in caught]
        assert fast.USING_EXTENSIONS is False
        assert fast.FairQueue is _queue_py.FairQueue
        assert fast.TokenBucket is _bucket_py.TokenBucket
        assert fast.LeastConnBalancer is _balancer_py.LeastConnBalancer
        assert fast.ROWWRITER_COMPILED is False
        assert fast.RowWriter is _rowwriter_py.RowWriter
        import sys
        assert "shardon._fast._rowwriter_c" not in sys.modules  # not even loaded
        """,
        SHARDON_NO_EXTENSIONS=value,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("value", ["", "0", "no", "false"])
def test_env_other_values_do_not_force(value: str) -> None:
    if load_compiled() is None:
        pytest.skip(NOT_BUILT)
    rowwriter_c, why = load_rowwriter()
    if rowwriter_c is None:
        pytest.skip(why)
    result = run_python(
        """
        import shardon._fast as fast
        from shardon._fast import _queue_c, _rowwriter_c
        assert fast.USING_EXTENSIONS is True
        assert fast.FairQueue is _queue_c.FairQueue
        assert fast.ROWWRITER_COMPILED is True
        assert fast.RowWriter is _rowwriter_c.RowWriter
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
        from shardon._fast import _queue_py, _rowwriter_py
        assert [w.category for w in caught] == [RuntimeWarning], caught
        assert str(caught[0].message) == (
            "shardon: compiled _fast extensions unavailable, using pure-Python twins"
        )
        assert fast.USING_EXTENSIONS is False
        assert fast.FairQueue is _queue_py.FairQueue
        assert fast.ROWWRITER_COMPILED is False
        assert fast.RowWriter is _rowwriter_py.RowWriter
        """
    )
    assert result.returncode == 0, result.stderr


def test_missing_rowwriter_alone_falls_back_with_its_own_warning() -> None:
    """Without the compiled writer (e.g. SQLite linked statically) only RowWriter falls back, with one warning."""
    if load_compiled() is None:
        pytest.skip(NOT_BUILT)
    result = run_python(
        """
        import sys, warnings
        sys.modules["shardon._fast._rowwriter_c"] = None  # makes the import fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import shardon._fast as fast
        from shardon._fast import _queue_c, _rowwriter_py
        assert [w.category for w in caught] == [RuntimeWarning], caught
        message = str(caught[0].message)
        assert message.startswith("shardon: compiled request-log writer unavailable ("), message
        assert message.endswith("), using its pure-Python twin"), message
        assert fast.USING_EXTENSIONS is True
        assert fast.FairQueue is _queue_c.FairQueue
        assert fast.ROWWRITER_COMPILED is False
        assert fast.RowWriter is _rowwriter_py.RowWriter
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
