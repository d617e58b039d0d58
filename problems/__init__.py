"""One Betty problem per level. Copy one of these to add a level of your own."""
from problems.base import LevelProblem, level_config
from problems.classifier import ClassifierProblem, RefinedClassifierProblem, RetrainedHeadProblem
from problems.gan import DiscriminatorProblem, GeneratorProblem, TruncationProblem
from problems.adversarial import AdversarialClassifierProblem, AdversarialGeneratorProblem
from problems.meta import MetaProblem
from problems.allocation import AllocationProblem

__all__ = ["LevelProblem", "level_config", "ClassifierProblem", "RefinedClassifierProblem", "RetrainedHeadProblem",
           "DiscriminatorProblem", "GeneratorProblem", "TruncationProblem", "AdversarialClassifierProblem",
           "AdversarialGeneratorProblem", "MetaProblem", "AllocationProblem"]
