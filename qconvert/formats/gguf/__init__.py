"""GGUF output: metadata (general.* and arch hyper-parameters), tokenizer export, streaming writer."""
