"""Task distributions: sinusoid regression and N-way K-shot image episodes."""

from .episodes import EpisodeSampler, ImageClasses
from .sinusoid import SinusoidTasks

__all__ = ["SinusoidTasks", "EpisodeSampler", "ImageClasses"]
