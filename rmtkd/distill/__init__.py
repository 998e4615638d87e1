"""Self-distillation: the losses that recover accuracy after each reduction step."""
from .losses import embedding_loss, kd_loss

__all__ = ["kd_loss", "embedding_loss"]
