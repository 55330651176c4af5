"""Run the tutorial notebooks at their small sizes under pytest.

Each notebook shrinks its sizes when the ``CI`` environment variable is set (``SMOKE = "CI" in
os.environ``). Setting it here, at collection time, makes ``pytest --nbmake tutorials`` (and a
test command whose ``testpaths`` include ``tutorials``) execute them in about a minute each even
on a machine where ``CI`` is not set; the notebook kernels inherit the variable. Run a notebook
in Jupyter for its full sizes.
"""

import os

os.environ.setdefault("CI", "1")
