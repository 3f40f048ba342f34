"""DiGIT pipeline: discriminative image tokenizer + autoregressive models, stage by stage."""

__version__ = "0.1.0"
