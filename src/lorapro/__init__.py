"""lorapro: LoRA-Pro optimizers for any LoRA model.

LoRA-Pro (Wang et al., ICLR 2025) adjusts the gradients of the LoRA factors so that a LoRA step equals a full
fine-tuning step with the best rank-r approximation of the full gradient.
"""

from . import functional
from .optim import LoRAProAdamW, LoRAProSGD
from .pairs import LoRAPair, find_lora_pairs

__version__ = "0.1.0"

__all__ = ["LoRAPair", "LoRAProAdamW", "LoRAProSGD", "__version__", "find_lora_pairs", "functional"]
