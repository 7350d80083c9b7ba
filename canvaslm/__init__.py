"""canvaslm: run, serve and fine-tune block-diffusion language models."""

from canvaslm.engine.lm import LM, GenerateResult, TextResult
from canvaslm.loading import load

__all__ = ["LM", "GenerateResult", "TextResult", "load"]
__version__ = "0.1.0"
