"""Run the tutorial notebooks at their small sizes under pytest.

Each notebook shrinks its sizes when the ``CI`` environment variable is set (``SMOKE = "CI" in
os.environ``). Setting it here, at collection time, makes ``pytest --nbmake tutorials`` (and a
test command whose ``testpaths`` include ``tutorials``) execute them in about a minute each even
on a machine where ``CI`` is not set; the notebook kernels inherit the variable. Run a notebook
in Jupyter for its full sizes.

The kernels also get one OpenMP thread (``OMP_NUM_THREADS=1``, read by torch at import), as the
test processes have (``tests/conftest.py``): with ``pytest -n 2`` two kernels with two threads
each oversubscribe a two-core machine, and the notebooks ran four to five times slower (measured:
the quickstart 51 s against 11 s alone). Notebooks that raise torch's thread count for their
full sizes keep one thread under ``CI`` for the same reason (07: 28 s against 7 s next to a busy
core; 08: 335 s against 26 s).
"""

import os

os.environ.setdefault("CI", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
