"""Encoders, the meta block A, heads and GANs, registered by name."""
import mlo.torch_version  # noqa: F401  (refuses a torch older than the project needs)
from mlo.models.registry import create_model, list_models, register_family, register_model, unknown_model
from mlo.models import encoders as _encoders, nas as _nas  # noqa: F401  (registers the encoders)
from mlo.models.gan import acgan as _acgan, biggan as _biggan, dcgan as _dcgan, light as _light  # noqa: F401  (registers the GANs)
from mlo.models.heads import META_FORMS, Classifier, MetaHead, MetaNeck, SpinalHead, create_head, create_meta



def has_batch_norm(*modules) -> bool:
    """Whether any of ``modules`` holds a BatchNorm layer (its output then depends on the batch)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    return any(isinstance(m, _BatchNorm) for module in modules if module is not None for m in module.modules())


__all__ = ["create_model", "list_models", "register_family", "register_model", "unknown_model", "Classifier",
           "MetaHead", "MetaNeck", "SpinalHead", "META_FORMS", "create_head", "create_meta", "has_batch_norm"]
