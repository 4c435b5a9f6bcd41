"""The web front end (FastAPI): REST, Open Inference Protocol, status page, metrics."""
