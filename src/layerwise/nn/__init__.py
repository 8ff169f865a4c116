# The running-statistics norms register in their own module; importing the package registers them before any
# lookup in the norm registry (`layerwise.nn.norms.NORMS`).
from . import running_norms  # noqa: F401
