"""Skills: taxonomies (and, with the data issue, the rule and LLM annotators)."""

from mose.skills.taxonomy import GENERAL, Level, Taxonomy, load_taxonomy

__all__ = ["GENERAL", "Level", "Taxonomy", "load_taxonomy"]
