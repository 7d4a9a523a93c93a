"""Integrations of the LoRA-Pro optimizers with training frameworks.

Each integration lives in its own submodule and imports its framework only when that submodule is imported,
so ``import lorapro`` never pulls in ``transformers`` (use ``from lorapro.integrations.transformers import
LoRAProTrainer``).
"""

__all__: list[str] = []
