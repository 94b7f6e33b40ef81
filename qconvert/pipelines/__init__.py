"""pipelines stage: the jobs that tie load, methods and formats together."""
