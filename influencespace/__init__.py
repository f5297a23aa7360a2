"""InfluenceSpace: influence-guided curation of image–text training sets, Ray-native.

Importing the package is cheap on purpose: torch, ray, faiss and friends are imported inside the
functions that use them, so ``influencespace --help`` answers at once.
"""

__version__ = "0.1.0"
