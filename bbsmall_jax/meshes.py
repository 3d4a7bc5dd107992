"""The one mesh of the project: a 1-D `data` axis over devices, batch rows sharded along it.

Training lays it over every device of every process (`train/sharding.py`); generation over this process's
own devices (`generation/sharding.py`). Both order the devices by process, then id, so that each process's
rows are one contiguous block.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A 1-D mesh over `devices`, ordered by (process, id)."""
    return Mesh(np.array(sorted(devices, key=lambda d: (d.process_index, d.id))), (DATA_AXIS,))
