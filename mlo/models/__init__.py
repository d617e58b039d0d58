"""Encoders, the meta block A, heads and GANs, registered by name."""
from mlo.models.registry import create_model, list_models, register_family, register_model, unknown_model
from mlo.models import encoders as _encoders  # noqa: F401  (registers the encoders)
from mlo.models.gan import acgan as _acgan, biggan as _biggan, dcgan as _dcgan, light as _light  # noqa: F401  (registers the GANs)
from mlo.models.heads import Classifier, MetaBlock

__all__ = ["create_model", "list_models", "register_family", "register_model", "unknown_model", "Classifier",
           "MetaBlock"]
