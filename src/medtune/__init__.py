"""medtune: QLoRA fine-tuning of causal LMs into medical classifiers."""
__version__ = "0.1.0"
