"""sdrt lean runtime: manifest, tokenizer, numpy schedulers, backends, pipeline, CLI. Never imports torch."""
