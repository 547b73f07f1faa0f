"""matrice: language-agnostic knowledge neurons with MATRICE (multilingual IG + uncertainty)."""

__version__ = "0.1.0"
