"""What an error that ends a script says: one `sys.excepthook` for the
package, asking the explainers the strategies registered.

Some errors reach the user from deep inside TensorFlow or h5py, in terms
that do not say what happened: a collective whose peer is gone, a parameter
server that stopped, two workers writing one file. They are raised where
nothing of ours runs in between (Keras' compiled step, Keras' callbacks),
and the user's model is not ours to wrap. What Python does with an uncaught
error is its `sys.excepthook`'s to say: one hook, installed once per
process, asks each explainer in turn and hands every error that none of
them recognises to the hook that was there before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

# An explainer returns an error to report in place of the one given (its
# TensorFlow traceback says nothing more), a note to print after it, or None
# when it does not recognise the error.
Explainer = Callable[[BaseException], BaseException | str | None]

_explainers: list[Explainer] = []
_previous_hook = None


def add_explainer(explainer: Explainer) -> None:
    """Asks `explainer` about every error that ends the script.

    Installs the package's hook on first use (after any hook already there);
    an explainer added twice is asked once.

    Args:
        explainer: Called with the uncaught error. Returns an error to
            report in its place, a note to print after it, or None.

    Example:

    ```python
    def explain_full_disk(error):
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return "The disk is full: free space or write elsewhere."
        return None

    add_explainer(explain_full_disk)
    ```
    """
    global _previous_hook
    if explainer not in _explainers:
        _explainers.append(explainer)
    if _previous_hook is None:
        _previous_hook = sys.excepthook
        sys.excepthook = _report


def chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then the errors it was raised from or while handling.

    Args:
        error: An error, or None.

    Returns:
        An iterator over the chain, each error once.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


def _report(kind, error, traceback) -> None:
    for explainer in _explainers:
        try:
            found = explainer(error)
        except Exception:  # noqa: BLE001 - an explainer must not hide the error
            found = None
        if isinstance(found, BaseException):
            _previous_hook(type(found), found, None)
            return
        if found is not None:
            _previous_hook(kind, error, traceback)
            print(f"\n{found}", file=sys.stderr, flush=True)
            return
    _previous_hook(kind, error, traceback)
