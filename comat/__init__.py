"""comat: train, evaluate and ablate text-to-image alignment methods (CoMat and its peers)."""

from comat.core.errors import ComatError

__version__ = "0.1.0"
__all__ = ["ComatError", "__version__"]
