"""Selection: methods that choose among the approximators, as scikit-learn's
``OrthogonalMatchingPursuitCV`` wraps ``OrthogonalMatchingPursuit``.

``auto`` (``select/auto.py``, the default method) runs candidate approximators and keeps the
one whose rows score best: bits per byte of the base model on a validation text
(``select/text.py``), else leave-out validation (``select/holdout.py``). A selector is
registered by name like an approximator (``select/base.py``); the approximate stage gives it
the ``SelectionContext`` it needs beyond the problem.
"""

from mergekit_omp.select.base import (
    Choice,
    ChosenApproximation,
    SelectionContext,
    Selector,
    selector,
)

__all__ = ["Choice", "ChosenApproximation", "SelectionContext", "Selector", "selector"]
