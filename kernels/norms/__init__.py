"""RMSNorm (zero-centred or plain, residual add fused) and gated RMSNorm; torch references in `naive`."""
from .triton_norms import gated_rms_norm, rms_norm

__all__ = ["rms_norm", "gated_rms_norm"]
