__version__ = "0.1.0"
from . import zoo  # noqa: F401 (imported for its side effect) registers the shipped backbones (weaktr/assets) with timm: timm.create_model("<asset name>")
