"""mose: skill-by-skill Mixture-of-Experts for vision-language models in embodied AI."""

from mose.config import MoSEConfig, TokenMoEConfig
from mose.convert import convert
from mose.modeling import from_pretrained, register_with_transformers
from mose.models.tiny import tiny_model
from mose.routing import SkillChain, SkillChoice
from mose.skills.taxonomy import Taxonomy, load_taxonomy

register_with_transformers()

__all__ = [
    "MoSEConfig",
    "SkillChain",
    "SkillChoice",
    "Taxonomy",
    "TokenMoEConfig",
    "convert",
    "from_pretrained",
    "load_taxonomy",
    "tiny_model",
]
__version__ = "0.1.0"
