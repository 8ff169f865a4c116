"""Layer-wise diagnostics of causal LMs (ours and Hugging Face families): one streaming pass, removal effects."""

from ..arch import SUPPORTED_FAMILIES, DepthView, depth_view
from .metrics import DepthDiagnosis, diagnose

__all__ = ["DepthView", "depth_view", "SUPPORTED_FAMILIES", "DepthDiagnosis", "diagnose"]
