"""jc2a: Joint Class-aware and Class-agnostic Alignment for few-shot segmentation."""

__version__ = "0.1.0"
