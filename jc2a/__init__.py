"""jc2a: Joint Class-aware and Class-agnostic Alignment for few-shot segmentation."""

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    """`jc2a.Predictor` imports torch and the model on first use only, so `import jc2a` stays light."""
    if name == "Predictor":
        from jc2a.runs.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'jc2a' has no attribute {name!r}")
