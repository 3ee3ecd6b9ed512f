"""Process-wide settings that must be in place before a library loads: set once, here.

Only the OpenMP wait policy, today. The CLI's ``main``, a torch model's ``fit`` (before it
first imports torch) and the test suite's ``conftest.py`` call :func:`set_up_process`.
"""

from __future__ import annotations

import os
import sys


def set_up_process() -> None:
    """Let idle OpenMP threads of torch sleep instead of spin, unless torch is loaded or the user chose.

    With GNU OpenMP's default (active waiting), each of the thousands of small parallel
    operations of the dynamical model's EM waits for a thread the OS has descheduled
    whenever other processes share the cores: on the 2-core development machine under
    load the pancreas fit took 129 s instead of 6.7 s. ``OMP_WAIT_POLICY=PASSIVE`` is read
    when the OpenMP runtime loads, so it is set only while torch is not imported yet, and
    a value the user set is kept. The thread count is left alone.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
