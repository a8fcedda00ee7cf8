"""pyclipq modules: layers whose weights are stored in pyclipq formats."""
from .attention import QuantMultiheadAttention
from .embedding import QuantEmbedding
from .fused_block import BlockParts, FusedBlock
from .linear import QuantLinear
from .open_clip_attention import QuantOpenClipAttention
from .packed import PackedWeight
from .parameter import PackedParameter
from .patch import PatchConv2d

__all__ = ["BlockParts", "FusedBlock", "PackedParameter", "PackedWeight", "PatchConv2d", "QuantEmbedding", "QuantLinear", "QuantMultiheadAttention",
           "QuantOpenClipAttention"]
