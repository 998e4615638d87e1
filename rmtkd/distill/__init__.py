"""Self-distillation: the losses that recover accuracy after each reduction step, and the
training loop that applies them."""
from .losses import embedding_loss, feature_loss, kd_loss
from .trainer import NonFiniteLossError, TeacherCache, distill

__all__ = ["kd_loss", "embedding_loss", "feature_loss", "distill", "NonFiniteLossError", "TeacherCache"]
