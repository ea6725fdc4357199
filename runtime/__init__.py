"""sdrt lean runtime: manifest, tokenizer, numpy schedulers, backends, pipeline, CLI. Never imports torch.

`from sdrt.runtime import Pipeline` is the Python API; it is imported on first use so that
`import sdrt.runtime` (and every CLI subcommand's start) stays fast.
"""

__all__ = ["Pipeline"]


def __getattr__(name: str):
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'sdrt.runtime' has no attribute {name!r}")
